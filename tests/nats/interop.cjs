// A second, independent NATS client (the `nats` npm package) speaking converge's wire
// format: CloudEvents 1.0 JSON in structured mode, Nats-Msg-Id = the event id.
//
//   node interop.cjs read URL STREAM N     read N events the relay published (a durable
//                                          consumer of its own), check each envelope,
//                                          print one JSON line per event
//   node interop.cjs write URL SUBJECT ID  publish one CloudEvent twice with the same
//                                          Nats-Msg-Id; print both acks' duplicate flags
const { connect, headers, AckPolicy, StringCodec } = require("nats");

const sc = StringCodec();

function fail(message) {
  console.error("interop: " + message);
  process.exit(1);
}

async function read(nc, stream, count) {
  const jsm = await nc.jetstreamManager();
  await jsm.consumers.add(stream, { durable_name: "interop-node", ack_policy: AckPolicy.Explicit });
  const consumer = await nc.jetstream().consumers.get(stream, "interop-node");
  for (let seen = 0; seen < count;) {
    const msg = await consumer.next({ expires: 5000 });
    if (msg === null) fail(`only ${seen} of ${count} events arrived`);
    const ce = JSON.parse(sc.decode(msg.data));
    for (const field of ["specversion", "id", "source", "type", "subject", "time"]) {
      if (typeof ce[field] !== "string") fail(`envelope without string '${field}'`);
    }
    if (ce.specversion !== "1.0") fail(`specversion ${ce.specversion}`);
    if (msg.headers.get("Nats-Msg-Id") !== ce.id) fail("Nats-Msg-Id is not the event id");
    if (msg.headers.get("Content-Type") !== "application/cloudevents+json") {
      fail("Content-Type is not application/cloudevents+json");
    }
    if (msg.subject !== "converge." + ce.type) fail(`subject ${msg.subject} for ${ce.type}`);
    console.log(JSON.stringify({ id: ce.id, type: ce.type, subject: ce.subject, data: ce.data }));
    msg.ack();
    seen++;
  }
}

async function write(nc, subject, id) {
  const js = nc.jetstream();
  const ce = {
    specversion: "1.0",
    id,
    source: "urn:interop:node",
    type: subject.replace(/^converge\./, ""),
    subject: "pay_node",
    time: new Date().toISOString(),
    datacontenttype: "application/json",
    data: { payment_id: "pay_node", amount: 250, currency: "EUR" },
  };
  const acks = [];
  for (let i = 0; i < 2; i++) {
    const h = headers();
    h.set("Content-Type", "application/cloudevents+json");
    const ack = await js.publish(subject, sc.encode(JSON.stringify(ce)), { msgID: id, headers: h });
    acks.push(ack.duplicate);
  }
  console.log(JSON.stringify({ duplicates: acks }));
}

(async () => {
  const [op, url, a, b] = process.argv.slice(2);
  if (!op || !url || !a || !b) fail("usage: interop.cjs read URL STREAM N | write URL SUBJECT ID");
  const nc = await connect({ servers: url.split(",") });
  if (op === "read") await read(nc, a, Number(b));
  else if (op === "write") await write(nc, a, b);
  else fail(`unknown operation '${op}'`);
  await nc.drain();
})().catch((e) => fail(e.stack || String(e)));
