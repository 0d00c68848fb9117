// Create a job and its items from Node.js with node-postgres (`pg`), then read the results once
// the worker announces the job's end on `job_finished`. Usage: DATABASE_URL=... node enqueue.mjs
import pg from "pg";

const store = process.env.STORE ?? "node-shop";
const products = [
  { id: "mug-1", name: "Enamel mug", material: "steel", colour: "blue" },
  { id: "tee-2", name: "Organic T-shirt", material: "cotton", sizes: ["S", "M", "L"] },
  { id: "lamp-3", name: "Desk lamp", description: "Adjustable arm, warm LED" },
];

const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
await client.connect();
// LISTEN before the job exists, so its ending cannot be missed however fast the worker is.
await client.query("LISTEN job_finished");
let jobId = null;
const finished = new Promise((resolve) => {
  client.on("notification", (message) => {
    const event = JSON.parse(message.payload);
    if (String(event.job_id) === jobId) resolve(event);
  });
});

await client.query("BEGIN");
const { rows } = await client.query(
  "INSERT INTO jobs (instance_id) VALUES ($1) RETURNING id", [store]);
jobId = rows[0].id; // a bigint: a string in node-postgres
// One statement for every item: a multi-row insert from a JSON array, every other column defaulted.
await client.query(
  `INSERT INTO job_items (job_id, instance_id, product_id, payload)
   SELECT $1, $2, product->>'id', product FROM jsonb_array_elements($3::jsonb) AS product`,
  [jobId, store, JSON.stringify(products)]);
await client.query("COMMIT"); // the worker hears of the items now, not before
console.error(`job ${jobId}: ${products.length} items for ${store}`);

const timeout = Number(process.env.TIMEOUT_SECONDS ?? 120) * 1000;
const event = await Promise.race([finished, new Promise((_, reject) => setTimeout(
  () => reject(new Error(`job ${jobId} did not finish in ${timeout / 1000} s`)), timeout))]);
const items = await client.query(
  "SELECT product_id, status, result, error FROM job_items WHERE job_id = $1 ORDER BY id",
  [jobId]);
console.log(JSON.stringify({ job: event, items: items.rows }, null, 2));
await client.end();
process.exit(event.status === "COMPLETED" ? 0 : 1);
