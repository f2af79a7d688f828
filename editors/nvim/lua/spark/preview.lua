-- The streaming preview: while the model writes its apply_patch, its chunks show in open
-- buffers as extmarks (removed lines highlighted, added lines as virtual lines). Buffer text
-- is never touched here; the daemon applies the edit and buffers.lua brings it in.

local M = {}

M.ns = vim.api.nvim_create_namespace("spark_preview")

local buffers = require("spark.buffers")

local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

-- Find `want` (a list of lines) in `lines` at or after `from`: exact first, then ignoring
-- surrounding whitespace, like the daemon's matcher's first passes.
local function find(lines, want, from)
  if #want == 0 then
    return from
  end
  for pass = 1, 2 do
    local eq = pass == 1 and function(a, b)
      return a == b
    end or function(a, b)
      return trim(a) == trim(b)
    end
    for i = from, #lines - #want + 1 do
      local ok = true
      for k = 1, #want do
        if not eq(lines[i + k - 1], want[k]) then
          ok = false
          break
        end
      end
      if ok then
        return i
      end
    end
  end
  return nil
end

--- Parse the (possibly incomplete) apply_patch text into files with chunks. Only complete
--- lines count; a chunk being written shows what has arrived of it.
function M.parse(text)
  local files = {}
  local file, chunk
  local lines = vim.split(text, "\n", { plain = true })
  table.remove(lines) -- the part after the last newline: incomplete (or empty)
  for _, l in ipairs(lines) do
    l = l:gsub("\r$", "")
    local path = l:match("^%*%*%* Update File: (.+)$")
    if path then
      file = { path = path, chunks = {} }
      chunk = nil
      table.insert(files, file)
    elseif l:match("^%*%*%* ") then
      if not l:match("^%*%*%* Move to: ") and not l:match("^%*%*%* End of File") then
        file = nil
      end
      chunk = nil
    elseif file then
      if l:sub(1, 2) == "@@" then
        chunk = { anchor = trim(l:sub(3)), ops = {} }
        table.insert(file.chunks, chunk)
      else
        if not chunk then
          chunk = { anchor = "", ops = {} }
          table.insert(file.chunks, chunk)
        end
        local tag, rest = l:sub(1, 1), l:sub(2)
        if l == "" then
          tag, rest = " ", ""
        end
        if tag == " " or tag == "-" or tag == "+" then
          table.insert(chunk.ops, { tag, rest })
        end
      end
    end
  end
  return files
end

--- Show `text` (the patch so far) in open buffers of `root`; returns the buffers marked.
function M.render(root, text)
  local marked = {}
  for _, f in ipairs(M.parse(text)) do
    for _, buf in ipairs(buffers.buffers_for(root .. "/" .. f.path)) do
      marked[buf] = true
      vim.api.nvim_buf_clear_namespace(buf, M.ns, 0, -1)
      -- Read again only when the text changed: a render per delta must not copy a
      -- 10,000-line buffer each time.
      local lines = buffers.lines(buf)
      local cursor = 1
      for _, c in ipairs(f.chunks) do
        if c.anchor ~= "" then
          local at = find(lines, { c.anchor }, cursor)
          if at then
            cursor = at + 1
          end
        end
        local old = {}
        for _, op in ipairs(c.ops) do
          if op[1] ~= "+" then
            table.insert(old, op[2])
          end
        end
        local at = find(lines, old, cursor)
        if at then
          local line = at -- next buffer line (1-based) the chunk walks over
          local added = {}
          local function flush()
            if #added == 0 then
              return
            end
            local virt = {}
            for _, a in ipairs(added) do
              table.insert(virt, { { a, "DiffAdd" } })
            end
            if line > 1 then
              vim.api.nvim_buf_set_extmark(buf, M.ns, line - 2, 0, { virt_lines = virt })
            else
              vim.api.nvim_buf_set_extmark(buf, M.ns, 0, 0, { virt_lines = virt, virt_lines_above = true })
            end
            added = {}
          end
          for _, op in ipairs(c.ops) do
            if op[1] == "+" then
              table.insert(added, op[2])
            else
              flush()
              if op[1] == "-" then
                vim.api.nvim_buf_set_extmark(buf, M.ns, line - 1, 0, { line_hl_group = "DiffDelete" })
              end
              line = line + 1
            end
          end
          flush()
          cursor = line
        end
      end
    end
  end
  return marked
end

function M.clear(bufs)
  for buf in pairs(bufs or {}) do
    if vim.api.nvim_buf_is_valid(buf) then
      vim.api.nvim_buf_clear_namespace(buf, M.ns, 0, -1)
    end
  end
end

return M
