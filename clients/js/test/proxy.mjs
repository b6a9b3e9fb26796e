// A real HTTP proxy in front of the live taskcast for the reporter's tests and bench: it
// counts the requests passing through it (per route), how many were in flight at once, and
// can answer the next few of one path itself (503 with Retry-After, as taskcast does when
// its queue is full). Every other request reaches the real server unchanged.

import http from "node:http";

const route = (path) =>
  path === "/api/progress" ? path : /^\/api\/tasks\/[^/]+\/progress$/.test(path) ? "/api/tasks/{id}/progress" : path;

export async function countingProxy(upstream) {
  const proxy = {
    requests: new Map(), // route -> requests
    largest: new Map(), // route -> largest request body, bytes
    inFlight: 0,
    maxInFlight: 0,
    refuse: new Map(), // path -> how many more to answer 503
    count: (path) => proxy.requests.get(path) ?? 0,
    total: () => [...proxy.requests.values()].reduce((a, b) => a + b, 0),
    refuseNext: (path, times = 1) => proxy.refuse.set(path, times),
    onRequest: null, // called with each request's path as it arrives, before it is answered
  };
  const server = http.createServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const path = new URL(req.url, "http://proxy").pathname;
    const size = chunks.reduce((n, c) => n + c.length, 0);
    proxy.requests.set(route(path), proxy.count(route(path)) + 1);
    proxy.largest.set(route(path), Math.max(proxy.largest.get(route(path)) ?? 0, size));
    proxy.onRequest?.(path);
    if ((proxy.refuse.get(path) ?? 0) > 0) {
      proxy.refuse.set(path, proxy.refuse.get(path) - 1);
      res.writeHead(503, { "content-type": "application/json", "retry-after": "0" });
      return res.end('{"error":"unavailable","message":"the proxy says so","hint":"retry"}');
    }
    proxy.maxInFlight = Math.max(proxy.maxInFlight, ++proxy.inFlight);
    try {
      const answer = await fetch(upstream + req.url, {
        method: req.method,
        headers: Object.fromEntries(["authorization", "content-type"].filter((h) => req.headers[h]).map((h) => [h, req.headers[h]])),
        body: req.method === "GET" ? undefined : Buffer.concat(chunks),
      });
      const headers = { "content-type": answer.headers.get("content-type") ?? "application/json" };
      if (answer.headers.get("retry-after")) headers["retry-after"] = answer.headers.get("retry-after");
      const body = Buffer.from(await answer.arrayBuffer());
      res.writeHead(answer.status, headers);
      res.end(body);
    } catch (e) {
      res.writeHead(502);
      res.end(String(e));
    } finally {
      proxy.inFlight--;
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  proxy.url = `http://127.0.0.1:${server.address().port}`;
  proxy.close = () => new Promise((resolve) => (server.closeAllConnections(), server.close(resolve)));
  return proxy;
}
