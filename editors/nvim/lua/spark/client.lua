-- The daemon connection: one Unix-socket pipe over vim.uv, JSON-RPC 2.0 as NDJSON
-- (docs/protocol.md "Framing", "Messages", "Handshake"). Everything here is asynchronous:
-- callbacks run on the main loop (vim.schedule), never inside luv's fast context.

local M = {}

local PROTOCOL_VERSION = 1
local PLUGIN_VERSION = "0.1.0"

-- Connection states: nil (none), "connecting", "ready".
local conn = nil
local waiting = {} -- callbacks waiting for a ready connection
local handlers = { event = nil, progress = nil, lost = nil, connected = nil }
local reconnect = { timer = nil, attempts = 0 }
-- Reconnecting stops after this many tries; the next command starts over.
local MAX_RECONNECTS = 20

M.opts = { sparkctl = "sparkctl", autostart = true }

local function env(name)
  local v = vim.env[name]
  if v == nil or v == "" then
    return nil
  end
  return v
end

--- The socket path, found like `proto/src/layout.rs` does it; nil and an error for a
--- relative path.
function M.socket_path()
  local s = env("SPARK_SOCKET")
  if s then
    if s:sub(1, 1) ~= "/" then
      return nil, "SPARK_SOCKET must be an absolute path, got " .. s
    end
    return s
  end
  local home = env("SPARK_HOME")
  if home then
    if home:sub(1, 1) ~= "/" then
      return nil, "SPARK_HOME must be an absolute path, got " .. home
    end
    return home .. "/run/sparkd.sock"
  end
  local xdg = env("XDG_RUNTIME_DIR")
  if xdg then
    if xdg:sub(1, 1) ~= "/" then
      return nil, "XDG_RUNTIME_DIR must be an absolute path, got " .. xdg
    end
    return xdg .. "/spark/sparkd.sock"
  end
  return ("/tmp/spark-%d/sparkd.sock"):format(vim.uv.geteuid())
end

function M.on(name, fn)
  handlers[name] = fn
end

function M.is_ready()
  return conn ~= nil and conn.state == "ready"
end

function M.info()
  return conn and conn.init
end

-- A value already encoded as JSON, spliced into a request as it is: a large unsaved buffer is
-- encoded once per change of its text (buffers.encoded), not once per ask.
local Encoded = {}

function M.encoded(json)
  return setmetatable({ json = json }, Encoded)
end

local function holds_encoded(v)
  if type(v) ~= "table" then
    return false
  end
  if getmetatable(v) == Encoded then
    return true
  end
  for _, x in pairs(v) do
    if holds_encoded(x) then
      return true
    end
  end
  return false
end

-- Append `v` as JSON to `parts`, M.encoded values as they are. Only the (small) tables around
-- them are walked here; everything else is encoded by vim.json in one call. The large parts
-- are never joined into one string: the pipe writes the list as it is.
local function encode_into(parts, v)
  if getmetatable(v) == Encoded then
    parts[#parts + 1] = v.json
  elseif not holds_encoded(v) then
    parts[#parts + 1] = vim.json.encode(v)
  elseif vim.islist(v) then
    for i, x in ipairs(v) do
      parts[#parts + 1] = i == 1 and "[" or ","
      encode_into(parts, x)
    end
    parts[#parts + 1] = "]"
  else
    local first = true
    for k, x in pairs(v) do
      parts[#parts + 1] = (first and "{" or ",") .. vim.json.encode(tostring(k)) .. ":"
      first = false
      encode_into(parts, x)
    end
    parts[#parts + 1] = "}"
  end
end

local function send(c, msg)
  if not holds_encoded(msg.params) then
    c.pipe:write(vim.json.encode(msg) .. "\n")
    return
  end
  local head = ('{"jsonrpc":"2.0","id":%d,"method":%s,"params":'):format(msg.id, vim.json.encode(msg.method))
  local parts = { head }
  encode_into(parts, msg.params)
  parts[#parts + 1] = "}\n"
  c.pipe:write(parts)
end

local function finish_waiting(err)
  local w = waiting
  waiting = {}
  for _, cb in ipairs(w) do
    cb(err, conn)
  end
end

local function dispatch(c, msg)
  if msg.id ~= nil and msg.method == nil then
    local p = c.pending[msg.id]
    if p then
      c.pending[msg.id] = nil
      p.cb(msg.error, msg.result)
    end
  elseif msg.method == "event" then
    if handlers.event then
      handlers.event(msg.params or {})
    end
  elseif msg.method == "ask/progress" then
    local p = msg.params or {}
    local pending = c.pending[p.request]
    if pending and pending.progress then
      pending.progress(p)
    end
  end
end

local function lost(c, why)
  if conn ~= c then
    return
  end
  conn = nil
  pcall(function()
    c.pipe:close()
  end)
  local pending = c.pending
  c.pending = {}
  local err = { code = -32603, message = why, data = { kind = "disconnected" } }
  for _, p in pairs(pending) do
    p.cb(err, nil)
  end
  if c.state == "connecting" then
    finish_waiting(err)
    return
  end
  if handlers.lost then
    handlers.lost(why)
  end
  M.schedule_reconnect()
end

local function on_data(c, data)
  c.buf = c.buf .. data
  while true do
    local nl = c.buf:find("\n", 1, true)
    if not nl then
      break
    end
    local line = c.buf:sub(1, nl - 1)
    c.buf = c.buf:sub(nl + 1)
    if line ~= "" then
      local ok, msg = pcall(vim.json.decode, line, { luanil = { object = true, array = true } })
      if ok and type(msg) == "table" then
        dispatch(c, msg)
      end
    end
  end
end

local function raw_request(c, method, params, cb, progress)
  c.next_id = c.next_id + 1
  local id = c.next_id
  c.pending[id] = { cb = cb, progress = progress }
  send(c, { jsonrpc = "2.0", id = id, method = method, params = params or vim.empty_dict() })
  return id
end

-- Connect once; cb(err) on the main loop.
local function connect(path, cb)
  local pipe = vim.uv.new_pipe(false)
  pipe:connect(path, function(err)
    vim.schedule(function()
      if err then
        pcall(function()
          pipe:close()
        end)
        cb(err)
        return
      end
      local c = { pipe = pipe, buf = "", pending = {}, next_id = 0, state = "connecting" }
      conn = c
      pipe:read_start(function(rerr, data)
        vim.schedule(function()
          if rerr then
            lost(c, "connection to sparkd failed: " .. rerr)
          elseif data == nil then
            lost(c, "sparkd closed the connection")
          else
            on_data(c, data)
          end
        end)
      end)
      raw_request(c, "initialize", {
        protocol_version = PROTOCOL_VERSION,
        client = { name = "spark.nvim", version = PLUGIN_VERSION },
      }, function(ierr, result)
        if ierr then
          cb(ierr.message or "initialize failed")
          lost(c, "handshake refused: " .. (ierr.message or "?"))
          return
        end
        c.init = result
        -- Events share this connection: edits from any client reload open buffers.
        raw_request(c, "subscribe", nil, function(serr)
          if serr then
            cb(serr.message)
            return
          end
          c.state = "ready"
          cb(nil)
        end)
      end)
    end)
  end)
end

-- Start the daemon the supported way: `sparkctl status` takes the startup lock and waits
-- until the daemon is ready (docs/protocol.md "Finding the socket").
local function autostart(cb)
  local ok, err = pcall(vim.system, { M.opts.sparkctl, "status" }, { text = true }, function(out)
    vim.schedule(function()
      if out.code ~= 0 then
        local first = (out.stderr or ""):match("[^\n]+") or ("exit " .. out.code)
        cb("could not start sparkd: " .. first)
      else
        cb(nil)
      end
    end)
  end)
  if not ok then
    cb("could not start sparkd: " .. M.opts.sparkctl .. " not found on PATH (" .. tostring(err) .. ")")
  end
end

local function nobody_answers(err)
  return type(err) == "string" and (err:find("ENOENT", 1, true) or err:find("ECONNREFUSED", 1, true))
end

--- Call cb(err, conn) once a ready connection exists, connecting (and starting the daemon)
--- if needed.
function M.ensure(cb, opts)
  opts = opts or {}
  if conn and conn.state == "ready" then
    cb(nil, conn)
    return
  end
  table.insert(waiting, cb)
  if conn then
    return -- a connection attempt is under way
  end
  local path, perr = M.socket_path()
  if not path then
    finish_waiting(perr)
    return
  end
  conn = { state = "connecting", pending = {}, pipe = { close = function() end } }
  local placeholder = conn
  local function attempt(may_start)
    connect(path, function(err)
      if not err then
        finish_waiting(nil)
        return
      end
      if may_start and nobody_answers(err) then
        autostart(function(serr)
          if serr then
            if conn == placeholder then
              conn = nil
            end
            finish_waiting(serr)
          else
            attempt(false)
          end
        end)
        return
      end
      if conn == placeholder or (conn and conn.state == "connecting") then
        conn = nil
      end
      finish_waiting(nobody_answers(err) and ("sparkd is not running (" .. path .. ")") or err)
    end)
  end
  attempt(M.opts.autostart and not opts.no_autostart)
end

--- Send a request; cb(err, result) with err the JSON-RPC error object (or a string).
--- progress(params) receives the request's `ask/progress` notifications.
function M.request(method, params, cb, progress)
  M.ensure(function(err, c)
    if err then
      cb(type(err) == "table" and err or { message = tostring(err) }, nil)
      return
    end
    raw_request(c, method, params, cb, progress)
  end)
end

function M.schedule_reconnect()
  if reconnect.timer or reconnect.attempts >= MAX_RECONNECTS then
    return
  end
  reconnect.attempts = reconnect.attempts + 1
  -- Capped backoff: a restarting daemon is usually back within a second.
  local delay = math.min(100 * 2 ^ (reconnect.attempts - 1), 5000)
  reconnect.timer = vim.defer_fn(function()
    reconnect.timer = nil
    M.ensure(function(err)
      if err then
        M.schedule_reconnect()
      else
        reconnect.attempts = 0
        if handlers.connected then
          handlers.connected()
        end
      end
    end, { no_autostart = true })
  end, delay)
end

--- Close the connection (used by tests and :SparkStatus --reconnect).
function M.close()
  if conn and conn.pipe then
    local c = conn
    conn = nil
    pcall(function()
      c.pipe:close()
    end)
  end
end

return M
