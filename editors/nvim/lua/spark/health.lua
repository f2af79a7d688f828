-- :checkhealth spark. Runs the checks over the real socket; waits (bounded) because
-- checkhealth expects its report synchronously.
local M = {}

local TIMEOUT_MS = 3000

local function wait_for(method, params)
  local spark = require("spark")
  spark.setup()
  local done, err, result = false, nil, nil
  spark._client.request(method, params, function(e, r)
    done, err, result = true, e, r
  end)
  vim.wait(TIMEOUT_MS, function()
    return done
  end, 10)
  if not done then
    return { message = "no answer within " .. TIMEOUT_MS .. " ms" }, nil
  end
  return err, result
end

function M.check()
  local h = vim.health
  local client = require("spark.client")
  h.start("spark")
  if vim.fn.has("nvim-0.10") == 1 then
    h.ok("Neovim " .. tostring(vim.version()))
  else
    h.error("Neovim 0.10 or newer is needed")
  end
  local path, perr = client.socket_path()
  if not path then
    h.error(perr)
    return
  end
  h.info("socket: " .. path)
  if vim.fn.executable(client.opts.sparkctl) == 1 then
    h.ok("sparkctl found: " .. vim.fn.exepath(client.opts.sparkctl))
  else
    h.warn("sparkctl not on PATH: the daemon cannot be started automatically")
  end
  local err, s = wait_for("status", nil)
  if err then
    h.error("sparkd: " .. (err.message or tostring(err)))
    return
  end
  local init = client.info() or {}
  h.ok(("sparkd %s (pid %d), protocol %d"):format(s.version, s.pid, init.protocol_version or s.protocol_version))
  local dir = vim.fn.expand("%:p:h")
  local repo = nil
  for _, r in ipairs(s.repos or {}) do
    if dir:sub(1, #r.path) == r.path then
      repo = r
    end
  end
  if repo then
    h.ok(("repository %s: %s, %d files"):format(repo.path, repo.watched and "watched" or "not watched", repo.files or 0))
    if repo.degraded then
      h.warn("watch degraded: " .. repo.degraded)
    end
  else
    h.info("this file's repository is not open in sparkd yet (it is after the first :SparkAsk)")
  end
  for _, x in ipairs(s.sessions or {}) do
    if x.connected then
      h.ok(("provider session for %s connected%s"):format(x.repo, x.rtt_ms and (", rtt %.1f ms"):format(x.rtt_ms) or ""))
    else
      h.warn(("provider session for %s not connected"):format(x.repo))
    end
  end
end

return M
