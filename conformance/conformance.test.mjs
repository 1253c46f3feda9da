// The official Durable Streams conformance suite, run against the server at CONFORMANCE_TEST_URL.
// The suite calls the global fetch and has no option for extra headers, so an Authorization
// header is added here to every request: Threadline runs it with auth on, like production.
import { runConformanceTests } from "@durable-streams/server-conformance-tests";

const token = process.env.CONFORMANCE_TOKEN;
if (token) {
  const original = globalThis.fetch;
  globalThis.fetch = (input, init = {}) => {
    const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
    if (!headers.has("authorization")) headers.set("authorization", `Bearer ${token}`);
    return original(input, { ...init, headers });
  };
}

runConformanceTests({
  baseUrl: process.env.CONFORMANCE_TEST_URL,
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_MS ?? 500),
  // The reserved subscription APIs (protocol §6-7): Threadline implements them. The suite's
  // webhook receiver listens on 127.0.0.1, which the server under test must allow
  // (THREADLINE_WEBHOOK_ALLOWED_HOSTS=127.0.0.1, as tests/test_conformance.py sets).
  subscriptions: true,
});
