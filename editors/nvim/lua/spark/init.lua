-- spark.nvim: ask sparkd for an edit from the buffer and watch it stream in.
--
-- Modules: client (socket, JSON-RPC, auto-start, reconnect), buffers (bringing landed edits
-- into open buffers), preview (streaming extmarks), health (:checkhealth spark).
-- The plugin keeps no logic the daemon has: it speaks docs/protocol.md and shows results.

local client = require("spark.client")
local buffers = require("spark.buffers")
local preview = require("spark.preview")

local M = {}

M.config = {
  -- Program used to start the daemon when nobody answers on the socket.
  sparkctl = "sparkctl",
  -- Start the daemon (through `sparkctl status`) when it is not running.
  autostart = true,
  -- Show the model's patch in open buffers while it streams.
  preview = true,
  -- Key that cancels the ask in flight, mapped in normal mode only while one runs (the
  -- mapping it shadows comes back afterwards); false for none.
  cancel_key = "<C-c>",
}

-- The ask in flight (one at a time from this editor; a newer one steers the older away).
local current = nil
local did_setup = false

--- One line in the command line, cut to fit so it never causes a hit-enter prompt.
local function say(msg, hl, history)
  msg = tostring(msg):gsub("\n.*", "")
  local room = math.max(vim.v.echospace - 1, 20)
  if vim.fn.strdisplaywidth(msg) > room then
    msg = vim.fn.strcharpart(msg, 0, room - 1) .. "…"
  end
  vim.api.nvim_echo({ { msg, hl } }, history or false, {})
end
M.say = say

local function err_text(err)
  if type(err) ~= "table" then
    return tostring(err)
  end
  local text = "spark: " .. (err.message or "request failed"):gsub("\n.*", "")
  local hint = err.data and err.data.hint
  if hint then
    text = text .. " (hint: " .. hint .. ")"
  end
  return text
end

local function fail(err)
  say(err_text(err), "ErrorMsg", true)
end

local function buf_path(buf)
  local name = vim.api.nvim_buf_get_name(buf or 0)
  if name == "" or vim.bo[buf or 0].buftype ~= "" then
    return nil
  end
  return vim.fn.fnamemodify(name, ":p")
end

-- The directory requests run in: the current file's, else Neovim's working directory.
local function cwd()
  local p = buf_path(0)
  if p then
    return vim.fn.fnamemodify(p, ":h")
  end
  return vim.fn.getcwd()
end

local function summary(files)
  local plus, minus = 0, 0
  for _, f in ipairs(files or {}) do
    plus = plus + (f.added or 0)
    minus = minus + (f.removed or 0)
  end
  return ("%d file%s +%d -%d"):format(#(files or {}), #(files or {}) == 1 and "" or "s", plus, minus)
end

-- Edits this editor asked for, and edits that could not be merged into a modified buffer:
-- an own edit that overlaps the user's unsaved typing is undone (the user's text wins), in
-- whichever order its event and its ask result arrive.
local own_edits, unmerged = {}, {}

local function settle(edit)
  local refused = unmerged[edit]
  if not refused or not own_edits[edit] then
    return
  end
  unmerged[edit], own_edits[edit] = nil, nil
  local names = {}
  for _, r in ipairs(refused) do
    table.insert(names, r.rel)
  end
  local where = table.concat(names, ", ")
  client.request("edit/undo", { cwd = refused[1].repo, id = edit }, function(err)
    if err then
      fail(err)
    else
      say(("spark: edit %s overlapped your unsaved changes in %s; undone, your text is untouched"):format(edit, where), "WarningMsg", true)
    end
  end)
end

-- Bring an edit's files into their open buffers.
local function land(repo, files, edit)
  local refused = {}
  for _, rel in ipairs(files or {}) do
    local abs = repo .. "/" .. rel
    for _, buf in ipairs(buffers.buffers_for(abs)) do
      local outcome = buffers.apply_file(buf, abs)
      if outcome == "conflict" or outcome == "unknown_base" then
        table.insert(refused, { buf = buf, rel = rel, repo = repo })
      end
    end
  end
  return refused
end

local function on_event(ev)
  if ev.type == "edit_applied" or ev.type == "edit_reverted" then
    local refused = land(ev.repo, ev.files, ev.edit)
    if #refused > 0 and ev.type == "edit_applied" then
      unmerged[ev.edit] = refused
      if current and not own_edits[ev.edit] then
        -- Maybe ours, its answer still on the way: settle() decides when it comes.
        return
      end
      if own_edits[ev.edit] then
        settle(ev.edit)
        return
      end
    end
    for _, r in ipairs(refused) do
      say(("spark: %s changed on disk (edit %s) and overlaps your unsaved changes; buffer kept"):format(r.rel, ev.edit), "WarningMsg", true)
    end
  elseif ev.type == "stopping" then
    say("spark: sparkd is stopping; will reconnect", "WarningMsg", false)
  end
end

local function on_lost(why)
  if current then
    preview.clear(current.marked)
  end
  say("spark: " .. why .. "; reconnecting", "WarningMsg", true)
end

-- Progress of the ask in flight.
local function on_progress(ask, p)
  if p.type == "patch" then
    ask.patch = ask.patch .. (p.delta or "")
    if M.config.preview and ask.root and not ask.render_pending then
      -- Coalesce: many deltas arrive per tick at 1,000 tokens/s; render once per tick.
      ask.render_pending = true
      vim.schedule(function()
        ask.render_pending = false
        if current == ask then
          local marked = preview.render(ask.root, ask.patch)
          for b in pairs(marked) do
            ask.marked[b] = true
          end
        end
      end)
    end
  elseif p.type == "tokens" then
    ask.tokens = p.output_tokens
    say(("spark: %d tokens · %.0f tok/s"):format(p.output_tokens or 0, p.tokens_per_s or 0), nil, false)
  elseif p.type == "patch_file" then
    say(("spark: writing %s"):format(p.path or "?"), nil, false)
  elseif p.type == "repair" then
    -- The corrected patch streams from its start: the preview starts over.
    ask.patch = ""
    preview.clear(ask.marked)
    say(("spark: the patch did not apply; asking for a corrected one (%s)"):format(p.reason or "?"), "WarningMsg", false)
  end
end

-- The daemon's limit on a file shown to the model (256 KiB).
local MAX_BUFFER_BYTES = 256 * 1024

-- The modified buffers of files in `root`: sent with the ask so the model sees what the user
-- sees (docs/protocol.md "Unsaved editor buffers"). Returns the wire list and, per buffer,
-- the lines sent (the base of the 3-way merge of what comes back).
local function unsaved(root)
  local list, sent = {}, {}
  if not root then
    return list, sent
  end
  local real_root = vim.uv.fs_realpath(root) or root
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(b) and vim.bo[b].modified then
      local p = buf_path(b)
      local real = p and (vim.uv.fs_realpath(p) or p)
      -- A file never written, or one over the daemon's limit, is not sent: the daemon would
      -- refuse the whole ask for it (docs/protocol.md); an edit to it then merges in from disk.
      if real and vim.startswith(real, real_root .. "/") and vim.uv.fs_stat(real) then
        -- Encoded once per change of the buffer: asking again sends the same JSON string.
        local text, json, lines = buffers.encoded(b)
        if #text <= MAX_BUFFER_BYTES then
          table.insert(list, { path = p, text = client.encoded(json) })
          sent[b] = { lines = lines, rel = real:sub(#real_root + 2) }
        end
      end
    end
  end
  return list, sent
end

-- The last ask's landed changes, for :SparkUndo: its recorded edit (disk part) and the undo
-- state each edited buffer was left in.
local last_landed = nil

-- Bring the ask's `buffer_edits` into the buffers they were sent from. Overlap with what the
-- user typed since applies nothing to that buffer; the user is told once.
local function land_buffers(ask, edits)
  local refused, landed = {}, {}
  for _, e in ipairs(edits or {}) do
    for b, s in pairs(ask.sent) do
      if s.rel == e.path and vim.api.nvim_buf_is_valid(b) then
        local outcome = buffers.apply_text(b, s.lines, e.text)
        if outcome == "conflict" then
          table.insert(refused, e.path)
        elseif outcome == "applied" then
          landed[b] = vim.api.nvim_buf_call(b, function()
            return vim.fn.undotree().seq_cur
          end)
        end
      end
    end
  end
  if #refused > 0 then
    say(
      ("spark: the edit overlaps what you typed since asking in %s; nothing applied there, your text is untouched"):format(
        table.concat(refused, ", ")
      ),
      "WarningMsg",
      true
    )
  end
  return landed, #refused
end

local cancel_map = nil -- the user's mapping the cancel key shadows while an ask runs

local function map_cancel_key()
  local key = M.config.cancel_key
  if not key or cancel_map then
    return
  end
  cancel_map = { key = key, saved = vim.fn.maparg(key, "n", false, true) }
  vim.keymap.set("n", key, function()
    M.cancel()
  end, { desc = "spark: cancel the ask in flight" })
end

local function unmap_cancel_key()
  if not cancel_map then
    return
  end
  pcall(vim.keymap.del, "n", cancel_map.key)
  if cancel_map.saved and not vim.tbl_isempty(cancel_map.saved) then
    vim.fn.mapset("n", false, cancel_map.saved)
  end
  cancel_map = nil
end

--- Ask for an edit. opts: prompt, range {start, end} (1-based lines) or nil for the whole file.
function M.ask(opts)
  local path = buf_path(0)
  local prompt = opts.prompt
  if not prompt or prompt == "" then
    fail("spark: give a prompt: :SparkAsk {what to do}")
    return
  end
  local params = { cwd = cwd(), prompt = prompt }
  local buf = vim.api.nvim_get_current_buf()
  if path then
    local focus = { path = vim.fn.fnamemodify(path, ":t") }
    if opts.range then
      focus.start_line, focus.end_line = opts.range[1], opts.range[2]
    end
    params.focus = { focus }
  end
  if current then
    preview.clear(current.marked)
  end
  local ask = { patch = "", marked = {}, started = vim.uv.hrtime(), params = params }
  ask.root = vim.fs.root(path or params.cwd, ".git")
  local list, sent = unsaved(ask.root)
  if #list > 0 then
    params.buffers = list
  end
  ask.sent = sent
  if path and not vim.bo[buf].modified then
    buffers.remember(buf)
  end
  current = ask
  map_cancel_key()
  say("spark: asking…", nil, false)
  client.request("ask", params, function(err, result)
    preview.clear(ask.marked)
    if current == ask then
      current = nil
      unmap_cancel_key()
    end
    if err then
      if err.data and err.data.kind == "cancelled" then
        say("spark: cancelled; nothing was applied", "WarningMsg", true)
      else
        fail(err)
      end
      return
    end
    local ms = (vim.uv.hrtime() - ask.started) / 1e6
    local landed, refused = land_buffers(ask, result.buffer_edits)
    local edit = result.edit ~= vim.NIL and result.edit or nil
    if edit or next(landed) then
      last_landed = { edit = edit, repo = params.cwd, bufs = landed }
    end
    if not edit and vim.tbl_isempty(result.buffer_edits or {}) then
      local answer = (result.answer or ""):gsub("%s+", " ")
      say(answer ~= "" and ("spark: " .. answer) or "spark: no change", nil, true)
      return
    end
    if edit then
      say(("spark: edit %s · %s · %.0f ms"):format(edit, summary(result.files), ms), nil, true)
      own_edits[edit] = true
      settle(edit)
    elseif refused == 0 then
      local n = #result.buffer_edits
      say(
        ("spark: edited %d unsaved buffer%s · %s · %.0f ms"):format(n, n == 1 and "" or "s", summary(result.files), ms),
        nil,
        true
      )
    end
  end, function(p)
    on_progress(ask, p)
  end)
  ask.sent_at = vim.uv.hrtime()
end

function M.cancel()
  client.request("cancel", { cwd = cwd() }, function(err, result)
    if err then
      fail(err)
    elseif not result.cancelled then
      say("spark: nothing to cancel", nil, false)
    end
  end)
end

local function edit_request(method, id, verb)
  local params = { cwd = cwd() }
  if id and id ~= "" then
    params.id = id
  end
  client.request(method, params, function(err, result)
    if err then
      fail(err)
    else
      say(("spark: %s edit %s · %s"):format(verb, result.edit, summary(result.files)), nil, true)
    end
  end)
end

--- Undo the last (or the given) edit. Without an id, the last ask from this editor is
--- taken back whole: its changes to unsaved buffers in the buffers (each was one undo step,
--- and is undone only if nothing was typed after it), its recorded edit on disk.
function M.undo(id)
  local l = last_landed
  if (id == nil or id == "") and l and next(l.bufs) then
    last_landed = nil
    local kept = {}
    for b, seq in pairs(l.bufs) do
      if vim.api.nvim_buf_is_valid(b) then
        local ok = vim.api.nvim_buf_call(b, function()
          if vim.fn.undotree().seq_cur ~= seq then
            return false
          end
          vim.cmd("silent undo")
          return true
        end)
        if not ok then
          table.insert(kept, vim.api.nvim_buf_get_name(b))
        end
      end
    end
    if #kept > 0 then
      say("spark: changed since the edit, so not undone there (use u): " .. table.concat(kept, ", "), "WarningMsg", true)
    end
    if l.edit then
      edit_request("edit/undo", l.edit, "undid")
    elseif #kept == 0 then
      say("spark: undid the edit in its buffers", nil, true)
    end
    return
  end
  if id == nil or id == "" then
    last_landed = nil
  end
  edit_request("edit/undo", id, "undid")
end

function M.stash(id)
  edit_request("edit/stash", id, "stashed")
end

local function scratch(name, lines, ft)
  local buf = vim.api.nvim_create_buf(false, true)
  vim.bo[buf].bufhidden = "wipe"
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, lines)
  vim.bo[buf].modifiable = false
  vim.bo[buf].filetype = ft
  pcall(vim.api.nvim_buf_set_name, buf, name)
  vim.cmd("split")
  vim.api.nvim_win_set_buf(0, buf)
  return buf
end

function M.show(id)
  local params = { cwd = cwd() }
  if id and id ~= "" then
    params.id = id
  end
  client.request("edit/show", params, function(err, result)
    if err then
      fail(err)
      return
    end
    local lines = vim.split(result.diff, "\n", { plain = true })
    if lines[#lines] == "" then
      table.remove(lines)
    end
    scratch("spark://show/" .. result.id, lines, "diff")
  end)
end

function M.log()
  local dir = cwd()
  client.request("edit/log", { cwd = dir, limit = 50 }, function(err, result)
    if err then
      fail(err)
      return
    end
    local lines, ids = {}, {}
    local now = os.time() * 1000
    for _, e in ipairs(result.edits) do
      local age = math.floor((now - e.at) / 1000)
      table.insert(
        lines,
        ("%s  %5s  %-8s %s  (%s)"):format(e.id, age .. "s", e.state, e.message, table.concat(e.files, ", "))
      )
      table.insert(ids, e.id)
    end
    if #lines == 0 then
      say("spark: no edits in " .. result.repo, nil, false)
      return
    end
    local buf = scratch("spark://log", lines, "sparklog")
    vim.b[buf].spark_cwd = dir
    vim.keymap.set("n", "<CR>", function()
      local id = ids[vim.api.nvim_win_get_cursor(0)[1]]
      if id then
        M.show(id)
      end
    end, { buffer = buf, desc = "spark: show this edit's diff" })
  end)
end

function M.status()
  client.request("status", nil, function(err, s)
    if err then
      fail(err)
      return
    end
    local sessions = 0
    for _, x in ipairs(s.sessions or {}) do
      if x.connected then
        sessions = sessions + 1
      end
    end
    say(
      ("spark: sparkd %s (pid %d), up %ds, %d repo%s, %d live session%s"):format(
        s.version,
        s.pid,
        math.floor((s.uptime_ms or 0) / 1000),
        #s.repos,
        #s.repos == 1 and "" or "s",
        sessions,
        sessions == 1 and "" or "s"
      ),
      nil,
      true
    )
  end)
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", M.config, opts or {})
  client.opts.sparkctl = M.config.sparkctl
  client.opts.autostart = M.config.autostart
  if did_setup then
    return
  end
  did_setup = true
  local group = vim.api.nvim_create_augroup("spark", { clear = true })
  buffers.setup(group)
  client.on("event", on_event)
  client.on("lost", on_lost)
  client.on("connected", function()
    say("spark: reconnected to sparkd", nil, false)
  end)
end

-- For tests and :checkhealth.
M._client = client
M._current = function()
  return current
end

return M
