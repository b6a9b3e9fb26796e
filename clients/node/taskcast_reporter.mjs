// The CLI the integration tests run (tests/api/reporter.rs), over the one Node reporter,
// `@taskcast/client/reporter` (clients/js/src/reporter.js); `Reporter` is re-exported so
// `import { Reporter } from "./taskcast_reporter.mjs"` keeps working in this checkout.
//
//   node clients/node/taskcast_reporter.mjs --url U --key K --task T [--stage S] [--delay MS]
//
// walks task T to completed with report() (fire-and-forget), prints the stats as JSON, and
// exits 0 after flush whether or not progress got through.
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";

import { Reporter } from "../js/src/reporter.js";

export { Reporter, ReporterError } from "../js/src/reporter.js";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const note = (text) => console.error(`taskcast_reporter: ${text}`);

async function main() {
  const { values: args } = parseArgs({
    options: {
      url: { type: "string", default: "http://127.0.0.1:8080" },
      key: { type: "string", default: process.env.TASK_PROCESS_SECRET_KEY ?? "development-key" },
      task: { type: "string" },
      stage: { type: "string", default: "done" },
      delay: { type: "string", default: "20" }, // milliseconds between updates
    },
  });
  if (!args.task) {
    note("usage: --url U --key K --task T [--stage S] [--delay MS]");
    return 2;
  }
  const reporter = new Reporter(args.url, args.key);
  reporter.report(args.task, { status: "pending", stage: "queued" });
  for (let percent = 0; percent <= 100; percent += 10) {
    reporter.report(args.task, { status: "processing", stage: "generating", progress: percent });
    await sleep(Number(args.delay));
  }
  reporter.report(args.task, { stage: "uploading" });
  const image_url = `https://cdn.example.com/taskcast/${args.task}.png`;
  reporter.report(args.task, { status: "completed", progress: 100, stage: args.stage, image_url });
  if (!(await reporter.flush(10000))) {
    note("some progress was not delivered; the generation itself is not affected");
  }
  console.log(JSON.stringify(reporter.stats));
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main();
}
