#!/usr/bin/env node
// A seed-style Node.js gateway, the baseline `docs/BENCHMARKS.md` compares Tether against: the
// kind of gateway the original system ran. `ws` + `jsonwebtoken` + `better-sqlite3`, SQLite in
// WAL mode with synchronous=FULL, one transaction (and fsync) per events message, the same
// events table and unique index as Tether's store, an ack only after the commit. It speaks
// enough of Tether's protocol (docs/PROTOCOL.md) for `tether bench ingest --gateway`: RS256
// tokens checked against the clinics' certificates, hello/welcome, events/ack, gap refusal.
// No schema checks, no decryption, no rate limits, no REST API: it is a yardstick, not a product.
//
// usage: node server.js --listen 127.0.0.1:9443 --certs DIR --db FILE [--audience gw-bench] [--plain]
'use strict';
const fs = require('fs');
const path = require('path');
const http = require('http');
const https = require('https');
const { WebSocketServer } = require('ws');
const jwt = require('jsonwebtoken');
const Database = require('better-sqlite3');

const args = {};
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === '--plain') args.plain = true;
  else args[a.replace(/^--/, '')] = process.argv[++i];
}
for (const k of ['listen', 'certs', 'db']) {
  if (!args[k]) {
    console.error(`missing --${k}`);
    process.exit(2);
  }
}
const audience = args.audience || 'gw-bench';
const [host, port] = args.listen.split(':');

const db = new Database(args.db);
db.pragma('journal_mode = WAL');
db.pragma('synchronous = FULL');
db.exec(`
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  clinic_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  entity TEXT NOT NULL,
  op TEXT NOT NULL,
  key_json TEXT NOT NULL,
  row_json TEXT,
  committed_at TEXT NOT NULL,
  received_at TEXT NOT NULL,
  problem TEXT,
  source_id INTEGER NOT NULL DEFAULT 0,
  UNIQUE (clinic_id, source_id, seq)
);
CREATE TABLE IF NOT EXISTS clinics (clinic_id TEXT PRIMARY KEY, acked_seq INTEGER NOT NULL);
`);
const getAcked = db.prepare('SELECT acked_seq FROM clinics WHERE clinic_id = ?');
const insert = db.prepare(
  'INSERT OR IGNORE INTO events (clinic_id, seq, entity, op, key_json, row_json, committed_at, received_at, source_id) ' +
  'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)');
const setAcked = db.prepare(
  'INSERT INTO clinics (clinic_id, acked_seq) VALUES (?, ?) ' +
  'ON CONFLICT (clinic_id) DO UPDATE SET acked_seq = max(acked_seq, excluded.acked_seq)');
const acked = (clinic) => (getAcked.get(clinic) || { acked_seq: 0 }).acked_seq;
const store = db.transaction((clinic, source, m) => {
  const have = acked(clinic);
  if (m.prev_seq > have) return { gap: have };
  const now = new Date().toISOString();
  let last = have;
  for (const e of m.events) {
    insert.run(clinic, e.seq, e.entity, e.op, JSON.stringify(e.key),
      e.row == null ? null : JSON.stringify(e.row), e.committed_at, now, source);
    if (e.seq > last) last = e.seq;
  }
  setAcked.run(clinic, last);
  return { acked: last };
});

// Clinic public keys: the certificates `tether keys dev-setup` wrote.
const keys = new Map();
function clinicKey(clinic) {
  if (!/^[A-Za-z0-9._-]{1,64}$/.test(clinic)) return null;
  if (!keys.has(clinic)) {
    try {
      keys.set(clinic, fs.readFileSync(path.join(args.certs, `${clinic}.pem`)));
    } catch {
      keys.set(clinic, null);
    }
  }
  return keys.get(clinic);
}
function verify(header) {
  const m = /^Bearer (.+)$/i.exec(header || '');
  if (!m) return null;
  const claims = jwt.decode(m[1]);
  const key = claims && clinicKey(String(claims.sub));
  if (!key) return null;
  try {
    return jwt.verify(m[1], key, { algorithms: ['RS256'], audience }).sub;
  } catch {
    return null;
  }
}

const server = args.plain
  ? http.createServer()
  : https.createServer({
    cert: fs.readFileSync(path.join(args.certs, 'gateway.pem')),
    key: fs.readFileSync(path.join(args.certs, 'gateway.key')),
  });
server.on('request', (req, res) => {
  res.writeHead(req.url === '/healthz' ? 200 : 404);
  res.end();
});
const wss = new WebSocketServer({ noServer: true, maxPayload: 1 << 20 });
server.on('upgrade', (req, socket, head) => {
  const clinic = req.url === '/v1/ws' ? verify(req.headers.authorization) : null;
  if (!clinic) {
    socket.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => session(ws, clinic));
});

let sessions = 0;
function session(ws, clinic) {
  const id = `s${++sessions}`;
  let hello = null;
  const send = (o) => ws.send(JSON.stringify(Object.assign({ v: 1 }, o)));
  const error = (code, message) => send({ type: 'error', code, message });
  ws.on('message', (data) => {
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      return error('bad_frame', 'not JSON');
    }
    if (m.v !== 1) return error('unsupported_version', 'v');
    if (m.type === 'hello') {
      if (m.clinic_id !== clinic) return ws.close(1008, 'clinic_id does not match the token');
      hello = m;
      return send({ type: 'welcome', session_id: id, acked_seq: acked(clinic), heartbeat_interval_ms: 10000, max_frame_bytes: 1 << 20 });
    }
    if (!hello) return ws.close(1008, 'hello expected');
    if (m.type === 'events') {
      if (!Array.isArray(m.events) || typeof m.prev_seq !== 'number') return error('bad_frame', 'events');
      let r;
      try {
        r = store(clinic, hello.source_id || 0, m);
      } catch (e) {
        error('store_unavailable', 'store write failed');
        return ws.close(1011, 'store write failed');
      }
      if (r.gap !== undefined) {
        error('gap', `prev_seq ${m.prev_seq} is beyond the stored position ${r.gap}`);
        return ws.close(1008, 'gap');
      }
      return send({ type: 'ack', seq: r.acked });
    }
  });
}

server.listen(Number(port), host, () => console.log(`node peer gateway on ${args.listen}`));
const stop = () => server.close(() => { db.close(); process.exit(0); });
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
