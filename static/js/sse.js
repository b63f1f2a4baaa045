// Server-sent events read with fetch(), because EventSource cannot send an Authorization header.

/** One event block's {event, data}; null for blocks that are only comments (keep-alives). */
function parseBlock(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

/**
 * Call onEvent(name, parsedData) for each event of a text/event-stream body, until the stream
 * ends or onEvent returns true (then the connection is closed).
 */
export async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let scanned = 0;  // where to look for the next blank line: events can be megabytes of base64
  let carry = "";  // a "\r" that may be the first half of "\r\n"
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      let text = carry + value;
      carry = text.endsWith("\r") ? "\r" : "";
      if (carry) text = text.slice(0, -1);
      buffer += text.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n", scanned)) >= 0) {
        const parsed = parseBlock(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        scanned = 0;
        if (parsed && onEvent(parsed.event, JSON.parse(parsed.data))) return;
      }
      scanned = Math.max(0, buffer.length - 1);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
