// A small client of the public HTTP API: nothing here that a curl user could not do.
"use strict";

const $ = (id) => document.getElementById(id);

async function refreshCluster() {
  try {
    const resp = await fetch("/v1/models");
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
    const select = $("model");
    const current = select.value;
    select.replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    if (current) select.value = current;
    const workers = body.data.reduce((sum, m) => sum + m.ready_workers, 0);
    $("cluster").textContent = body.data.length
      ? `${workers} worker(s) ready: ${body.data.map((m) => m.id).join(", ")}`
      : "no worker is ready yet";
  } catch (err) {
    $("cluster").textContent = `cluster unreachable: ${err.message}`;
  }
}

function requestBody() {
  const body = { prompt: $("prompt").value, model: $("model").value || undefined,
                 size: $("size").value || "auto", n: Number($("n").value || 1),
                 output_format: $("output_format").value };
  for (const name of ["steps", "seed"]) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  if ($("guidance").value !== "") body.guidance = Number($("guidance").value);
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  return body;
}

function showError(message) {
  $("status").textContent = message;
  $("status").className = "error";
}

function showImages(body) {
  const mime = `image/${body.output_format}`;
  // Prepend in reverse, so the first seed stays first.
  for (const item of [...body.data].reverse()) {
    const figure = document.createElement("figure");
    const img = new Image();
    img.src = `data:${mime};base64,${item.b64_json}`;
    img.alt = `generated image, seed ${item.seed}`;
    const caption = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = img.src;
    link.download = `image-${item.seed}.${body.output_format === "jpeg" ? "jpg" : body.output_format}`;
    link.textContent = "download";
    const seed = document.createElement("button");
    seed.type = "button";
    seed.textContent = `seed ${item.seed}`;
    seed.title = "reuse this seed";
    seed.onclick = () => { $("seed").value = item.seed; };
    caption.append(seed, link);
    figure.append(img, caption);
    $("results").prepend(figure);
  }
}

async function generate(event) {
  event.preventDefault();
  $("go").disabled = true;
  $("status").className = "";
  $("status").textContent = "generating…";
  const started = performance.now();
  try {
    const resp = await fetch("/v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    const body = await resp.json();
    if (!resp.ok) {
      const field = body.error.param ? ` (${body.error.param})` : "";
      showError(`${body.error.message}${field}`);
      return;
    }
    showImages(body);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("status").textContent = `${body.data.length} image(s) ${body.width}×${body.height} in ${seconds} s`;
  } catch (err) {
    showError(`could not reach the server: ${err.message}`);
  } finally {
    $("go").disabled = false;
  }
}

$("generate").addEventListener("submit", generate);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("generate").requestSubmit();
});
refreshCluster();
setInterval(refreshCluster, 5000);
