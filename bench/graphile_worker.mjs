// One Graphile Worker process with a no-op task, for bench.peers (the Node peer of
// bench/peer_workers.py, speaking the same stdout lines):
//
//   node bench/graphile_worker.mjs MODULES_DIR migrate URL
//   node bench/graphile_worker.mjs MODULES_DIR work URL [performance|defaults]
//
// MODULES_DIR is the scratch folder `npm install graphile-worker@<version>` ran in; the package
// is imported from there by path (it is ESM, and this script lives outside that folder).
// "performance" is the preset of Graphile's performance page (concurrency 24, pool 25, local
// queue 500, batched completion and failure); "defaults" is Graphile's own defaults
// (concurrency 1, pool 10, no local queue, one completion statement per job).
// Prints `ready`, then `first <unix time>` when its first job starts and
// `probe <key> <unix time>` when a job whose payload key starts with `probe-` starts. SIGTERM
// stops it gracefully.
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modulesDir, mode, connectionString, preset = "performance"] = process.argv.slice(2);
const graphile = await import(
  pathToFileURL(join(modulesDir, "node_modules", "graphile-worker", "dist", "index.js")).href
);

const PRESETS = {
  performance: {
    concurrentJobs: 24,
    maxPoolSize: 25,
    localQueue: { size: 500 },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
  defaults: {},
};

// Quiet: the harness reads stdout; warnings and errors still go to stderr.
const logger = new graphile.Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`[graphile ${level}] ${message}`);
});

if (mode === "migrate") {
  await graphile.runMigrations({ connectionString, logger });
  process.exit(0);
}

let first = false;
const taskList = {
  noop: async (payload) => {
    // Microseconds, like the harness's time.time(): Date.now() is whole milliseconds, and its
    // truncation made pickups look up to 1 ms shorter (one came out at -0.97 ms).
    const now = (performance.timeOrigin + performance.now()) / 1000;
    if (!first) {
      first = true;
      process.stdout.write(`first ${now.toFixed(6)}\n`);
    }
    const key = payload && payload.key;
    if (typeof key === "string" && key.startsWith("probe-")) {
      process.stdout.write(`probe ${key} ${now.toFixed(6)}\n`);
    }
  },
};

const runner = await graphile.run({
  preset: { worker: { connectionString, ...PRESETS[preset] } },
  taskList,
  logger,
  noHandleSignals: true,
});
process.stdout.write("ready\n");
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    runner.stop().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  });
}
await runner.promise;
