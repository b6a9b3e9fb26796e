// Requests per flush and updates/s of a Node reporter for a worker with 1, 10 and 100 tasks
// at once, against the real taskcast on Postgres, requests counted at a proxy. Prints, never
// asserts. After a round to warm up, each round reports one update per task and waits for them (flush(), or the
// awaited push()es), 50 rounds per size.
//
//   TASKCAST_BIN=target/debug/taskcast scripts/with-postgres \
//     node clients/js/test/bench-reporter.mjs [report|push] [module, default ../src/reporter.js]
//
// The module may be another copy of a reporter (e.g. main's, from `git show`) to compare.

import path from "node:path";
import { pathToFileURL } from "node:url";

import { countingProxy } from "./proxy.mjs";
import { Taskcast } from "./taskcast.mjs";

const flavour = process.argv[2] ?? "report";
const module = process.argv[3] ? pathToFileURL(path.resolve(process.argv[3])).href : "../src/reporter.js";
const { Reporter } = await import(module);
const ROUNDS = 50;

const server = await Taskcast.launch();
try {
  console.log(`${flavour}() of ${process.argv[3] ?? "src/reporter.js"}; ${ROUNDS} rounds per size`);
  for (const n of [1, 10, 100]) {
    const ids = [];
    for (let i = 0; i < n; i++) ids.push((await server.createTask()).task_id);
    const proxy = await countingProxy(server.base);
    const reporter = new Reporter(proxy.url, server.pushKey);
    let started;
    let warm;
    for (let round = 0; round <= ROUNDS; round++) {
      if (round === 1) [started, warm] = [performance.now(), proxy.total()]; // round 0 warms up
      const fields = { status: "processing", progress: (100 * round) / ROUNDS };
      if (flavour === "push") {
        await Promise.all(ids.map((id) => reporter.push(id, fields)));
      } else {
        ids.forEach((id) => reporter.report(id, fields));
        if (!(await reporter.flush(30_000))) throw new Error(`not delivered: ${JSON.stringify(reporter.stats)}`);
      }
    }
    const seconds = (performance.now() - started) / 1000;
    const requests = proxy.total() - warm;
    console.log(
      `${String(n).padStart(3)} tasks: ${(requests / ROUNDS).toFixed(2).padStart(6)} requests per flush, ` +
        `${Math.round((n * ROUNDS) / seconds).toString().padStart(5)} updates/s (${requests} requests, ${seconds.toFixed(2)} s)`,
    );
    await proxy.close();
  }
} finally {
  await server.close();
}
