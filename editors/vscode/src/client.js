'use strict';
// The daemon connection: one Unix socket through Node's `net`, JSON-RPC 2.0 as NDJSON
// (docs/protocol.md "Framing", "Messages", "Handshake"). Requests share the connection with
// `event` notifications (after `subscribe`) and `ask/progress` notifications.

const net = require('net');
const os = require('os');
const path = require('path');
const { execFile } = require('child_process');
const { EventEmitter } = require('events');

const PROTOCOL_VERSION = 1;
// A restarting daemon is usually back within a second; keep trying, never faster than this.
const RECONNECT_MIN_MS = 100;
const RECONNECT_MAX_MS = 3000;

function envVar(env, name) {
  const v = env[name];
  return v === undefined || v === '' ? undefined : v;
}

/** The socket path, found as `proto/src/layout.rs` does; throws on a relative path. */
function socketPath(env = process.env, uid = os.userInfo().uid) {
  const rules = [
    ['SPARK_SOCKET', (v) => v],
    ['SPARK_HOME', (v) => path.join(v, 'run', 'sparkd.sock')],
    ['XDG_RUNTIME_DIR', (v) => path.join(v, 'spark', 'sparkd.sock')],
  ];
  for (const [name, make] of rules) {
    const v = envVar(env, name);
    if (v !== undefined) {
      if (!path.isAbsolute(v)) throw new Error(`${name} must be an absolute path, got ${v}`);
      return make(v);
    }
  }
  return `/tmp/spark-${uid}/sparkd.sock`;
}

class RpcError extends Error {
  constructor(err) {
    super(err.message || 'request failed');
    this.code = err.code;
    this.data = err.data || {};
  }
}

function nobodyAnswers(err) {
  return err && (err.code === 'ENOENT' || err.code === 'ECONNREFUSED');
}

/**
 * Emits `event` (daemon events), `state` ('connecting' | 'ready' | 'lost'), `lost` (reason).
 * `options()` returns { socket, sparkctl, autostart, clientVersion } at each connection.
 */
class Client extends EventEmitter {
  constructor(options) {
    super();
    this.options = options;
    this.sock = null;
    this.ready = null; // Promise of a ready connection, while one is being made or is up
    this.pending = new Map();
    this.nextId = 0;
    this.buf = '';
    this.info = null;
    this.closed = false;
    this.reconnectTimer = null;
    this.reconnectDelay = RECONNECT_MIN_MS;
  }

  isReady() {
    return this.sock !== null && this.info !== null;
  }

  /** A ready connection (connecting, and starting the daemon through sparkctl, if needed). */
  ensure(mayStart = true) {
    if (!this.ready) {
      this.ready = this.connectOrStart(mayStart).catch((e) => {
        this.ready = null;
        throw e;
      });
    }
    return this.ready;
  }

  async connectOrStart(mayStart) {
    const opts = this.options();
    const target = opts.socket || socketPath();
    try {
      await this.connect(target, opts);
    } catch (e) {
      if (!(mayStart && opts.autostart && nobodyAnswers(e))) {
        throw nobodyAnswers(e) ? new Error(`sparkd is not running (${target})`) : e;
      }
      // The supported way to start a daemon: `sparkctl status` takes the startup lock (one
      // daemon however many clients try) and waits until it serves (docs/protocol.md).
      await this.autostart(opts, target);
      await this.connect(target, opts);
    }
  }

  autostart(opts, target) {
    return new Promise((resolve, reject) => {
      const env = { ...process.env };
      if (opts.socket) env.SPARK_SOCKET = target;
      execFile(opts.sparkctl, ['status'], { env, timeout: 30000 }, (err, _out, stderr) => {
        if (!err) return resolve();
        const first = String(stderr || '').split('\n')[0] || err.message;
        reject(new Error(`could not start sparkd with ${opts.sparkctl}: ${first}`));
      });
    });
  }

  connect(target, opts) {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(target);
      let settled = false;
      const fail = (e) => {
        if (settled) return;
        settled = true;
        sock.destroy();
        reject(e);
      };
      sock.setEncoding('utf8');
      sock.once('error', fail);
      sock.once('connect', async () => {
        this.sock = sock;
        this.buf = '';
        sock.removeListener('error', fail);
        sock.on('error', () => {}); // 'close' follows and says it
        sock.on('data', (chunk) => this.onData(chunk));
        sock.on('close', () => this.onClose(sock));
        try {
          const init = await this.raw('initialize', {
            protocol_version: PROTOCOL_VERSION,
            client: { name: 'spark-vscode', version: opts.clientVersion || '0.0.0' },
          });
          await this.raw('subscribe', {});
          this.info = init;
          settled = true;
          this.reconnectDelay = RECONNECT_MIN_MS;
          this.emit('state', 'ready');
          resolve();
        } catch (e) {
          fail(e);
        }
      });
    });
  }

  onData(chunk) {
    this.buf += chunk;
    let nl;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      if (line.trim() === '') continue;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        continue; // not ours to judge; the daemon only writes JSON lines
      }
      this.dispatch(msg);
    }
  }

  dispatch(msg) {
    if (msg.id !== undefined && msg.id !== null && msg.method === undefined) {
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.error) p.reject(new RpcError(msg.error));
      else p.resolve(msg.result);
    } else if (msg.method === 'event') {
      this.emit('event', msg.params || {});
    } else if (msg.method === 'ask/progress') {
      const p = this.pending.get((msg.params || {}).request);
      if (p && p.progress) p.progress(msg.params);
    }
  }

  onClose(sock) {
    if (this.sock !== sock) return;
    const wasReady = this.info !== null;
    this.sock = null;
    this.info = null;
    this.ready = null;
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      p.reject(new RpcError({ code: -32603, message: 'lost the connection to sparkd', data: { kind: 'disconnected' } }));
    }
    if (wasReady && !this.closed) {
      this.emit('state', 'lost');
      this.scheduleReconnect();
    }
  }

  scheduleReconnect() {
    if (this.reconnectTimer || this.closed) return;
    const delay = this.reconnectDelay;
    this.reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_MS);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      // Reconnect only: a daemon that was stopped on purpose is started again by the next
      // command, not behind the user's back.
      this.ensure(false).then(
        () => this.emit('reconnected'),
        () => this.scheduleReconnect(),
      );
    }, delay);
  }

  raw(method, params, progress) {
    const id = ++this.nextId;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, progress });
      this.sock.write(JSON.stringify({ jsonrpc: '2.0', id, method, params: params || {} }) + '\n');
    });
  }

  /** Send a request once connected; `progress` receives its `ask/progress` params. */
  async request(method, params, progress) {
    await this.ensure(true);
    return this.raw(method, params, progress);
  }

  dispose() {
    this.closed = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.sock) this.sock.destroy();
  }
}

module.exports = { Client, RpcError, socketPath, PROTOCOL_VERSION };
