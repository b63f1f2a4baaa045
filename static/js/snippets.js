// "Copy as curl" and "Copy as Python": the current settings as code for the blocking endpoint
// (/v1/images/edits, with the input saved as input.png and the mask as mask.png, for an edit).
import { currentKey } from "./apikey.js";
import { $ } from "./dom.js";
import { formText } from "./edits.js";

const OPENAI_FIELDS = ["model", "prompt", "n", "size", "output_format", "output_compression"];

const shellQuote = (text) => `'${text.replaceAll("'", `'"'"'`)}'`;

/** A Python literal for a JSON value (JSON strings are valid Python string literals). */
function pyValue(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(pyValue).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyValue(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

const extension = (format) => (format === "jpeg" ? "jpg" : format);

/** The curl arguments that send an edit as multipart/form-data: its files, then its fields. */
function editArguments(body, edit) {
  const files = ["image=@input.png", edit === "inpaint" ? "mask=@mask.png" : null].filter(Boolean);
  const fields = Object.entries(body).map(([name, value]) => shellQuote(`${name}=${formText(value)}`));
  return [...files, ...fields].map((part) => `  -F ${part} \\\n`).join("");
}

/** edit: null, or "edit"/"inpaint" to send the body with input.png (and mask.png). */
export function curlCommand(body, origin = location.origin, edit = null) {
  const auth = currentKey() ? `  -H "Authorization: Bearer $DC_API_KEY" \\\n` : "";
  const ext = extension(body.output_format);
  const request = edit ? `curl -s ${origin}/v1/images/edits \\\n${auth}${editArguments(body, edit)}`
    : `curl -s ${origin}/v1/images/generations \\
  -H 'Content-Type: application/json' \\
${auth}  -d ${shellQuote(JSON.stringify(body, null, 2))} \\\n`;
  return `${request}  | python3 -c 'import sys, json, base64
r = json.load(sys.stdin)
if "error" in r: sys.exit(r["error"]["message"])
for d in r["data"]:
    open("seed-%d.${ext}" % d["seed"], "wb").write(base64.b64decode(d["b64_json"]))
    print("saved seed-%d.${ext}" % d["seed"])'
`;
}

export function pythonCode(body, origin = location.origin, edit = null) {
  const args = OPENAI_FIELDS.filter((name) => name in body)
    .map((name) => `    ${name}=${pyValue(body[name])},`);
  // An edit goes as multipart form fields, all text: a list (`loras`) as its JSON.
  const extra = Object.fromEntries(Object.entries(body).filter(([name]) => !OPENAI_FIELDS.includes(name))
    .map(([name, value]) => [name, edit && typeof value === "object" ? JSON.stringify(value) : value]));
  if (Object.keys(extra).length) args.push(`    extra_body=${pyValue(extra)},`);
  const key = currentKey() ? `os.environ["DC_API_KEY"]` : `"unused"`;
  return `import base64
${currentKey() ? "import os\n" : ""}
from openai import OpenAI

client = OpenAI(base_url="${origin}/v1", api_key=${key})
result = client.images.${edit ? "edit" : "generate"}(
${edit ? editFiles(edit) : ""}${args.join("\n")}
)
for image in result.data:
    with open(f"seed-{image.seed}.${extension(body.output_format)}", "wb") as out:
        out.write(base64.b64decode(image.b64_json))
    print("saved", out.name)
`;
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // The clipboard API needs a secure context (https or localhost); fall back to a selection.
    $("code-text").select();
    return document.execCommand("copy");
  }
}

/** Show the code in a dialog, selected, and copy it to the clipboard when the browser lets us. */
export async function showCode(title, text) {
  $("code-title").textContent = title;
  $("code-text").value = text;
  $("code-note").textContent = "";
  $("code-dialog").showModal();
  $("code-text").focus();
  $("code-text").select();
  $("code-text").scrollTop = 0;
  const copied = await copy(text);
  $("code-note").textContent = copied ? "Copied to the clipboard."
    : "Select the text and copy it: this browser blocks clipboard access here.";
}

const editFiles = (edit) => `    image=open("input.png", "rb"),\n` +
  (edit === "inpaint" ? `    mask=open("mask.png", "rb"),\n` : "");

/** currentEdit(): null, or "edit"/"inpaint" while the form holds an input image. */
export function initSnippets(currentBody, currentEdit = () => null) {
  const note = (title) => (currentEdit()
    ? `${title}: save the input image as input.png${currentEdit() === "inpaint" ? " and the mask as mask.png" : ""}`
    : title);
  $("copy-curl").addEventListener("click", () => {
    showCode(note("curl"), curlCommand(currentBody(), location.origin, currentEdit()));
  });
  $("copy-python").addEventListener("click", () => {
    showCode(note("Python (openai package)"), pythonCode(currentBody(), location.origin, currentEdit()));
  });
  $("code-copy").addEventListener("click", async () => {
    const copied = await copy($("code-text").value);
    $("code-note").textContent = copied ? "Copied to the clipboard." : "Copy failed; select the text and copy it.";
  });
}
