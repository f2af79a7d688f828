-- Run by bench/nvim.sh: times the Neovim plugin's three paths (docs/BENCHMARKS.md, "Neovim
-- plugin") on a 10,000-line buffer. Arguments: repository, plugin directory, iterations.
local repo, plugin, n = arg[1], arg[2], tonumber(arg[3] or "100")
vim.opt.rtp:prepend(plugin)
vim.cmd("runtime plugin/spark.lua")
vim.o.swapfile = false
local spark = require("spark")
spark.setup({})
local client = require("spark.client")
local preview = require("spark.preview")

local function ms(ns)
  return ns / 1e6
end
local function report(name, xs)
  table.sort(xs)
  local function p(q)
    return xs[math.max(1, math.ceil(#xs * q))]
  end
  io.stdout:write(("%-46s n=%4d  p50 %7.3f ms  p90 %7.3f ms  p99 %7.3f ms\n"):format(name, #xs, p(0.5), p(0.9), p(0.99)))
end
local function wait(what, cond)
  assert(vim.wait(30000, cond, 1), "timed out: " .. what)
end

vim.cmd.edit(repo .. "/big.rs")
local buf = vim.api.nvim_get_current_buf()
assert(vim.api.nvim_buf_line_count(buf) == 10000)
local ready = false
client.ensure(function(err)
  assert(not err, err)
  ready = true
end)
wait("the daemon", function()
  return ready
end)

-- The moment a request is handed to the socket: every pipe shares one metatable.
local pipe_methods = getmetatable(vim.uv.new_pipe(false)).__index
local raw_write = pipe_methods.write
local written = {}
pipe_methods.write = function(pipe, data, ...)
  -- The time first: finding the method in a 180 KB request is the bench's work, not the plugin's.
  local now = vim.uv.hrtime()
  -- A request with a large unsaved buffer is written as a list of parts, the method in the first.
  local head = type(data) == "table" and data[1] or data
  local method = type(head) == "string" and head:match('"method":"([^"]+)"')
  if method then
    written[method] = now
  end
  return raw_write(pipe, data, ...)
end

-- The moment an edit_applied event is read off the socket (the client decodes each line).
local decode = vim.json.decode
local event_at = nil
vim.json.decode = function(line, ...)
  if not event_at and type(line) == "string" and line:find('"edit_applied"', 1, true) then
    event_at = vim.uv.hrtime()
  end
  return decode(line, ...)
end

-- The end of the plugin's reload of a buffer (text, undo step, views, file timestamp).
local buffers = require("spark.buffers")
local apply_file = buffers.apply_file
local reloaded_at = nil
buffers.apply_file = function(...)
  local outcome = apply_file(...)
  reloaded_at = vim.uv.hrtime()
  return outcome
end

-- Every change to the buffer's text, as the user would see it.
local changed_at = nil
vim.api.nvim_buf_attach(buf, false, {
  on_lines = function()
    changed_at = changed_at or vim.uv.hrtime()
  end,
})

-- 1. A daemon edit (another client's edit/apply) → the open, unmodified buffer shows it.
local patch = "*** Begin Patch\n*** Update File: big.rs\n@@ fn main() {\n+    // edited\n*** End Patch\n"
local e2e, daemon, plugin_part, plugin_all = {}, {}, {}, {}
for _ = 1, n do
  changed_at, event_at, reloaded_at = nil, nil, nil
  local t0, result = vim.uv.hrtime(), nil
  client.request("edit/apply", { cwd = repo, patch = patch, message = "bench" }, function(err, r)
    assert(not err, err and err.message)
    assert(r.edit ~= vim.NIL, "the edit landed")
    result = r
  end)
  wait("the edit in the buffer", function()
    return changed_at ~= nil and reloaded_at ~= nil and result ~= nil
  end)
  table.insert(e2e, ms(changed_at - t0))
  table.insert(plugin_part, ms(changed_at - event_at))
  table.insert(plugin_all, ms(reloaded_at - event_at))
  table.insert(daemon, result.total_ms)
end
assert(not vim.bo[buf].modified, "the reload left the buffer unmodified")

-- 2. :SparkAsk → the ask request on the socket, for an unmodified and a modified buffer
-- (whose 10,000 lines then travel with the ask).
local function asks(label)
  local xs = {}
  for _ = 1, n do
    written.ask = nil
    local t0 = vim.uv.hrtime()
    vim.cmd("SparkAsk add a line")
    wait("the ask on the socket", function()
      return written.ask ~= nil
    end)
    table.insert(xs, ms(written.ask - t0))
    wait("the ask to finish", function()
      return spark._current() == nil
    end)
  end
  report(":SparkAsk → request on the socket, " .. label, xs)
end
asks("unmodified")
vim.api.nvim_buf_set_lines(buf, -1, -1, false, { "// unsaved" })
asks("modified (buffer sent)")

-- 3. The streaming preview: one render per delta (the plugin renders at most once per event
-- loop tick, so this is its worst case), for a patch near the end of the buffer, in 4-byte
-- deltas as a fast model streams them.
local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
local at = #lines - 10
local stream = ("*** Begin Patch\n*** Update File: big.rs\n@@\n %s\n-%s\n+let changed = 1;\n+let also = 2;\n %s\n*** End Patch\n"):format(
  lines[at - 1],
  lines[at],
  lines[at + 1]
)
local per_delta, so_far = {}, ""
for _ = 1, math.max(1, math.floor(n / 20)) do
  so_far = ""
  for i = 1, #stream, 4 do
    local t0 = vim.uv.hrtime()
    so_far = so_far .. stream:sub(i, i + 3)
    preview.render(repo, so_far)
    table.insert(per_delta, ms(vim.uv.hrtime() - t0))
  end
end
local marks = vim.api.nvim_buf_get_extmarks(buf, preview.ns, 0, -1, {})
assert(#marks == 2, "the preview marks the removed line and the added lines")
preview.clear({ [buf] = true })

report("daemon edit → buffer shows it (end to end)", e2e)
report("  of which the daemon's edit/apply", daemon)
report("  of which event read → buffer shows it", plugin_part)
report("  of which event read → reload done", plugin_all)
report("preview update per delta, 10,000 lines", per_delta)
vim.cmd("qa!")
