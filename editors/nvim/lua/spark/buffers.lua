-- Bringing landed edits into open buffers without a reload prompt and without losing a
-- keystroke. A buffer's "base" is the text it had when it last matched the file (read,
-- written, or reloaded by us): the common ancestor of the user's unsaved typing and the
-- daemon's edit, so a modified buffer can take the edit by a 3-way merge.

local M = {}

local diff = (vim.text and vim.text.diff) or vim.diff
local base = {} -- bufnr -> lines

-- What each buffer held at a changedtick: its lines, and (made when first needed) the bytes
-- `:write` would put on disk and their JSON string. Asking again, rendering every preview
-- delta and reloading after an edit then read a 10,000-line buffer once per change of its
-- text, not once per use. The tables are shared: nobody may modify them.
local snaps = {} -- bufnr -> { tick, lines, format, text, json }

--- The buffer's lines (shared, read-only), read again only when its text changed.
function M.lines(buf)
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  local s = snaps[buf]
  if not s or s.tick ~= tick then
    s = { tick = tick, lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false) }
    snaps[buf] = s
  end
  return s.lines
end

-- `lines` is what the buffer holds now (we just put it there): no need to read it back.
local function seed(buf, lines)
  snaps[buf] = { tick = vim.api.nvim_buf_get_changedtick(buf), lines = lines }
end

local function realpath(p)
  return vim.uv.fs_realpath(p) or p
end

--- Open, loaded buffers whose file is `abs` (compared after resolving symlinks).
function M.buffers_for(abs)
  local want = realpath(abs)
  local out = {}
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(b) and vim.bo[b].buftype == "" then
      local name = vim.api.nvim_buf_get_name(b)
      if name ~= "" and (name == abs or realpath(name) == want) then
        table.insert(out, b)
      end
    end
  end
  return out
end

local BOM = "\239\187\191"

--- `data` (a file's bytes) as Neovim would read it into `buf` (LF or CRLF, final newline).
function M.split(data, buf)
  if data:sub(1, 3) == BOM then
    data = data:sub(4)
  end
  -- A plain find loop: several times faster than vim.split on a large file.
  local lines, n, at = {}, 0, 1
  while true do
    local nl = data:find("\n", at, true)
    if not nl then
      break
    end
    n = n + 1
    lines[n] = data:sub(at, nl - 1)
    at = nl + 1
  end
  if at <= #data then
    lines[n + 1] = data:sub(at)
  end
  if vim.bo[buf].fileformat == "dos" then
    for i, l in ipairs(lines) do
      lines[i] = l:gsub("\r$", "")
    end
  end
  return lines
end

--- `data` split as M.split does, for a file most of whose lines are those of `known` (the
--- buffer's): the unchanged first and last lines are found in `data` where they are, without
--- making a string for each, and only the lines between are split.
function M.split_like(data, buf, known)
  if vim.bo[buf].fileformat ~= "unix" or data:sub(1, 3) == BOM then
    return M.split(data, buf)
  end
  local find, byte = string.find, string.byte
  local n, at, pre = #known, 1, 0
  while pre < n do
    local l = known[pre + 1]
    if find(data, l, at, true) ~= at or byte(data, at + #l) ~= 10 then
      break
    end
    pre, at = pre + 1, at + #l + 1
  end
  -- From the end: `stop` is the newline that ends the lines not yet matched.
  local suf, stop = 0, #data
  while suf < n - pre and byte(data, stop) == 10 do
    local l = known[n - suf]
    local s = stop - #l
    if s < at or (s > 1 and byte(data, s - 1) ~= 10) or find(data, l, s, true) ~= s then
      break
    end
    suf, stop = suf + 1, s - 1
  end
  local mid = M.split(data:sub(at, stop), buf)
  local lines = {}
  for i = 1, pre do
    lines[i] = known[i]
  end
  for i = 1, #mid do
    lines[pre + i] = mid[i]
  end
  local k = pre + #mid
  for i = n - suf + 1, n do
    k = k + 1
    lines[k] = known[i]
  end
  return lines
end

--- The bytes `:write` would put on disk for `buf` (its lines by default).
function M.text(buf, lines)
  lines = lines or vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  local bo = vim.bo[buf]
  local nl = bo.fileformat == "dos" and "\r\n" or (bo.fileformat == "mac" and "\r" or "\n")
  local text = table.concat(lines, nl)
  if bo.eol or (bo.fixeol and not bo.binary) then
    text = text .. nl
  end
  if bo.bomb then
    text = BOM .. text
  end
  return text
end

--- The buffer's bytes as `:write` would put them on disk, their JSON string (for a request)
--- and its lines, each made once per change of the text (or of the options that shape it).
function M.encoded(buf)
  local lines = M.lines(buf)
  local s = snaps[buf]
  local bo = vim.bo[buf]
  local format = bo.fileformat
    .. tostring(bo.eol)
    .. tostring(bo.fixeol)
    .. tostring(bo.binary)
    .. tostring(bo.bomb)
  if s.format ~= format then
    s.format, s.text, s.json = format, M.text(buf, lines), nil
  end
  s.json = s.json or vim.json.encode(s.text)
  return s.text, s.json, lines
end

-- The file's bytes, read with one open (nil if it cannot be read).
local function read_file(path)
  local fd = vim.uv.fs_open(path, "r", 0)
  if not fd then
    return nil
  end
  local stat = vim.uv.fs_fstat(fd)
  -- One byte more than its size, to see the end of the file in the same read; more reads
  -- only if it grew meanwhile.
  local want = (stat and stat.size or 0) + 1
  local parts, at = {}, 0
  while true do
    local chunk = vim.uv.fs_read(fd, want, at)
    if not chunk then
      vim.uv.fs_close(fd)
      return nil
    end
    if chunk == "" then
      break
    end
    parts[#parts + 1] = chunk
    at = at + #chunk
    if #chunk < want then
      break
    end
    want = 65536
  end
  vim.uv.fs_close(fd)
  return #parts == 1 and parts[1] or table.concat(parts)
end

function M.remember(buf)
  if vim.api.nvim_buf_is_loaded(buf) then
    base[buf] = M.lines(buf)
  end
end

function M.forget(buf)
  base[buf] = nil
  snaps[buf] = nil
end

-- Half-open [s, e) ranges of `base` lines a diff hunk replaces (a pure insertion is empty).
-- The common first and last lines are skipped before diffing: an edit touches a few lines of
-- a large file, and diffing only the middle keeps a 10,000-line buffer cheap.
local function hunks(a, b)
  local na, nb = #a, #b
  local pre = 0
  while pre < na and pre < nb and a[pre + 1] == b[pre + 1] do
    pre = pre + 1
  end
  local suf = 0
  while suf < na - pre and suf < nb - pre and a[na - suf] == b[nb - suf] do
    suf = suf + 1
  end
  if pre == na and pre == nb then
    return {}
  end
  local mid_a = table.concat(a, "\n", pre + 1, na - suf)
  local mid_b = table.concat(b, "\n", pre + 1, nb - suf)
  mid_a = na - suf > pre and mid_a .. "\n" or ""
  mid_b = nb - suf > pre and mid_b .. "\n" or ""
  local out = {}
  for _, h in ipairs(diff(mid_a, mid_b, { result_type = "indices" })) do
    local sa, ca, sb, cb = h[1] + pre, h[2], h[3] + pre, h[4]
    local s = ca == 0 and sa + 1 or sa
    table.insert(out, { s = s, e = s + ca, sb = sb, cb = cb, delta = cb - ca })
  end
  return out
end

-- Tell Neovim the buffer matches the file now, so neither a later :checktime nor :write
-- warns that the file changed (W12): the stored timestamp is updated before
-- FileChangedShell runs, and our handler chooses to do nothing.
local function sync_timestamp(buf)
  local id = vim.api.nvim_create_autocmd("FileChangedShell", {
    buffer = buf,
    callback = function()
      vim.v.fcs_choice = ""
    end,
  })
  vim.api.nvim_buf_call(buf, function()
    -- Without a local 'autoread' an unmodified buffer would be re-read (an extra undo step).
    vim.opt_local.autoread = false
    vim.cmd("silent! checktime " .. buf)
    vim.cmd("set autoread<")
  end)
  pcall(vim.api.nvim_del_autocmd, id)
end

local function break_undo()
  vim.cmd("let &l:undolevels = &l:undolevels")
end

--- Merge `new` into `buf` 3-way: `ancestor` is the text both derive from, the buffer's lines
--- are the user's side (`ancestor` itself when `reload`: an unmodified buffer taking its file's
--- new content, so nothing to merge, no second diff of a large buffer, and the buffer stays
--- unmodified). Returns "same", "applied" or "conflict" (then nothing changed). Exactly one
--- undo step; cursors, views, marks and extmarks stay on their text.
function M.merge(buf, ancestor, new, reload)
  local theirs = hunks(ancestor, new)
  local ours = reload and {} or hunks(ancestor, M.lines(buf))
  if #theirs == 0 then
    return "same"
  end
  -- Touching ranges count as overlapping, as in git's merge.
  for _, t in ipairs(theirs) do
    for _, u in ipairs(ours) do
      if t.s <= u.e and u.s <= t.e then
        return "conflict"
      end
    end
  end
  -- Every window on the buffer keeps its cursor and view on the same text.
  local views = {}
  for _, win in ipairs(vim.fn.win_findbuf(buf)) do
    views[win] = vim.api.nvim_win_call(win, vim.fn.winsaveview)
  end
  local moves = {} -- {first buffer line, lines replaced, lines inserted}, bottom-up
  vim.api.nvim_buf_call(buf, function()
    -- Exactly one undo step: closed off from the user's last change and from their next.
    break_undo()
    if reload then
      -- The undo step records whether the buffer was modified before it: say yes, as after
      -- Neovim's own reload, so `u` leaves the buffer modified (it no longer matches disk).
      vim.bo[buf].modified = true
    end
    for i = #theirs, 1, -1 do
      local t = theirs[i]
      local shift = 0
      for _, u in ipairs(ours) do
        if u.e < t.s then
          shift = shift + u.delta
        end
      end
      local repl = {}
      for j = t.sb, t.sb + t.cb - 1 do
        table.insert(repl, new[j])
      end
      local from = t.s - 1 + shift
      if i < #theirs then
        -- Into the same undo step even if something (another plugin's on_lines) closed it.
        pcall(vim.cmd, "silent undojoin")
      end
      vim.api.nvim_buf_set_lines(buf, from, from + (t.e - t.s), false, repl)
      table.insert(moves, { from + 1, t.e - t.s, #repl })
    end
    break_undo()
  end)
  if reload then
    vim.bo[buf].modified = false
  end
  if #ours == 0 then
    seed(buf, new)
  end
  local function map(lnum)
    -- Hunks are bottom-up, so each one's position is in the coordinates before the next.
    for i = #moves, 1, -1 do
      local first, old_n, new_n = moves[i][1], moves[i][2], moves[i][3]
      if lnum >= first + old_n then
        lnum = lnum + new_n - old_n
      elseif lnum >= first then
        lnum = first
      end
    end
    return math.max(1, math.min(lnum, vim.api.nvim_buf_line_count(buf)))
  end
  for win, view in pairs(views) do
    if vim.api.nvim_win_is_valid(win) then
      view.lnum = map(view.lnum)
      view.topline = map(view.topline)
      vim.api.nvim_win_call(win, function()
        vim.fn.winrestview(view)
      end)
    end
  end
  return "applied"
end

--- Bring the file's new content into `buf`. Returns "same", "reloaded", "merged",
--- "conflict" or "unknown_base" (a modified buffer whose base we do not know).
function M.apply_file(buf, path)
  local data = read_file(path)
  if not data then
    return "missing"
  end
  local modified = vim.bo[buf].modified
  local ancestor = modified and base[buf] or M.lines(buf)
  if not ancestor then
    return "unknown_base"
  end
  local new = M.split_like(data, buf, ancestor)
  local outcome = M.merge(buf, ancestor, new, not modified)
  if outcome == "conflict" then
    return outcome
  end
  base[buf] = new
  if not modified then
    vim.bo[buf].modified = false
  end
  sync_timestamp(buf)
  if outcome == "same" then
    return "same"
  end
  return modified and "merged" or "reloaded"
end

--- Bring an unsaved buffer's edited text (an ask's `buffer_edits`) into `buf`, merged with
--- what the user typed since `sent` (the lines sent with the ask). The file on disk, and so
--- the buffer's base, are unchanged: the buffer stays modified.
function M.apply_text(buf, sent, text)
  return M.merge(buf, sent, M.split(text, buf))
end

function M.setup(group)
  vim.api.nvim_create_autocmd({ "BufReadPost", "BufWritePost", "FileReadPost" }, {
    group = group,
    callback = function(ev)
      M.remember(ev.buf)
    end,
  })
  vim.api.nvim_create_autocmd({ "BufUnload", "BufWipeout" }, {
    group = group,
    callback = function(ev)
      M.forget(ev.buf)
    end,
  })
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(b) and not vim.bo[b].modified then
      M.remember(b)
    end
  end
end

return M
