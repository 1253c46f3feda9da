#!/usr/bin/env node
// The Durable Streams reference server (@durable-streams/server), as a peer for benchmarks.
//
//   node bench/peer/server.mjs [--port N] [--host H] [--data-dir DIR] [--long-poll-timeout-ms MS]
//                              [--no-compression] [--max-file-handles N]
//
// Each flag falls back to an env var: PEER_PORT (default 0 = any free port), PEER_HOST
// (default 127.0.0.1), PEER_DATA_DIR (unset = in-memory store; set = the file store, LMDB plus
// append-only logs), PEER_LONG_POLL_MS (default 30000, the package's own default),
// PEER_COMPRESSION=0, PEER_MAX_FILE_HANDLES (file store only: how many stream files it keeps open;
// the package's default is 100 and DurableStreamTestServer does not pass it on, so past 100
// streams appended to at once its appends fail; the chat benchmark runs up to 1,000). Stdout carries exactly one line, `listening <url>`, once the server accepts
// connections; the package's own log lines go to stderr. SIGTERM / SIGINT stop it cleanly.
import { parseArgs } from "node:util";
import { DurableStreamTestServer, FileBackedStreamStore } from "@durable-streams/server";

// Keep stdout for the ready line: the package logs info lines with console.info.
console.info = console.error;
console.log = console.error;

function fail(message) {
  process.stderr.write(`server.mjs: ${message}\n`);
  process.exit(2);
}

let values;
try {
  ({ values } = parseArgs({
    options: {
      port: { type: "string" },
      host: { type: "string" },
      "data-dir": { type: "string" },
      "long-poll-timeout-ms": { type: "string" },
      "no-compression": { type: "boolean" },
      "max-file-handles": { type: "string" },
    },
    strict: true,
  }));
} catch (err) {
  fail(err.message);
}

function integer(name, raw, fallback) {
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) fail(`${name} must be a non-negative integer, got ${raw}`);
  return value;
}

const env = process.env;
const dataDir = values["data-dir"] ?? (env.PEER_DATA_DIR || undefined);
const options = {
  port: integer("--port", values.port ?? env.PEER_PORT, 0),
  host: values.host ?? (env.PEER_HOST || "127.0.0.1"),
  longPollTimeout: integer("--long-poll-timeout-ms", values["long-poll-timeout-ms"] ?? env.PEER_LONG_POLL_MS, 30000),
  compression: !(values["no-compression"] || env.PEER_COMPRESSION === "0"),
  ...(dataDir ? { dataDir } : {}),
};

const server = new DurableStreamTestServer(options);
const maxFileHandles = integer("--max-file-handles", values["max-file-handles"] ?? env.PEER_MAX_FILE_HANDLES, 0);
if (maxFileHandles > 0 && dataDir) {
  // The same file store, with a larger pool of open stream files (see the header).
  await server.store.close();
  server.store = new FileBackedStreamStore({ dataDir, maxFileHandles });
}
let url;
try {
  url = await server.start();
} catch (err) {
  fail(`could not start: ${err.stack ?? err}`);
}
process.stdout.write(`listening ${url}\n`);

let stopping = false;
async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  // Idle keep-alive sockets would hold server.close() open; a stuck close must not hang forever.
  const timer = setTimeout(() => {
    process.stderr.write(`server.mjs: stop timed out after ${signal}\n`);
    process.exit(1);
  }, 10000);
  timer.unref();
  const stopped = server.stop();
  server.server?.closeIdleConnections?.();
  try {
    await stopped;
    process.exit(0);
  } catch (err) {
    process.stderr.write(`server.mjs: error while stopping: ${err.stack ?? err}\n`);
    process.exit(1);
  }
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
