// A fetch-based reader for POST /api/v1/chat (SPEC §8), for browsers, React
// Native (with a streaming fetch) and Node >= 18. It replaces two examples of
// seed 002 that cannot work: a native EventSource cannot POST a body or send
// an Authorization header, and the React Native reader looked for
// "event: token" on the data: line. SSE pairs each "event:" line with the
// "data:" lines that follow it, up to a blank line; comments start with ":".
export async function streamChat({ url, token, body, onToken, onUsage, onDone, onComment, signal }) {
  const response = await fetch(url, {
    method: "POST",
    headers: {
      Accept: "text/event-stream",
      Authorization: `Bearer ${token}`,
      "Content-Type": "application/json",
    },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    const error = await response.json(); // {message, errorCode}: plain JSON before any stream
    throw new Error(`${response.status} ${error.errorCode}: ${error.message}`);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) throw new Error("stream ended without a done event"); // a dropped connection
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) onComment?.(line.slice(1).trim());
        else if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (!data.length) continue;
      const payload = JSON.parse(data.join("\n"));
      if (event === "token") onToken?.(payload.text);
      else if (event === "usage") onUsage?.(payload);
      else if (event === "done") {
        onDone?.(payload.finish_reason);
        reader.cancel();
        return payload.finish_reason;
      }
    }
  }
}

// node scripts/clients/v1_chat_reader.mjs URL TOKEN MESSAGE: prints one JSON line per event.
if (typeof process !== "undefined" && import.meta.url === `file://${process.argv[1]}`) {
  const [url, token, message] = process.argv.slice(2);
  const print = (kind, value) => console.log(JSON.stringify({ [kind]: value }));
  await streamChat({
    url,
    token,
    body: { message },
    onComment: (text) => print("comment", text),
    onToken: (text) => print("token", text),
    onUsage: (usage) => print("usage", usage),
    onDone: (reason) => print("done", reason),
  });
}
