-- Commands of spark.nvim. Defining them costs nothing: the modules load on first use, and
-- nothing connects to the daemon until a command runs. No keymaps are set (see :h spark).
if vim.g.loaded_spark then
  return
end
vim.g.loaded_spark = true

if vim.fn.has("nvim-0.10") ~= 1 then
  vim.api.nvim_echo({ { "spark.nvim needs Neovim 0.10 or newer", "ErrorMsg" } }, true, {})
  return
end

local function spark()
  local m = require("spark")
  m.setup()
  return m
end

local command = vim.api.nvim_create_user_command

command("SparkAsk", function(o)
  local range = nil
  if o.range > 0 then
    range = { o.line1, o.line2 }
  end
  if o.args ~= "" then
    spark().ask({ prompt = o.args, range = range })
    return
  end
  vim.ui.input({ prompt = "spark: " }, function(prompt)
    if prompt and prompt ~= "" then
      spark().ask({ prompt = prompt, range = range })
    end
  end)
end, { nargs = "*", range = true, desc = "spark: ask for an edit (a range focuses those lines)" })

command("SparkCancel", function()
  spark().cancel()
end, { desc = "spark: cancel the ask in flight" })

command("SparkUndo", function(o)
  spark().undo(o.args)
end, { nargs = "?", desc = "spark: undo the last (or a given) edit" })

command("SparkStash", function(o)
  spark().stash(o.args)
end, { nargs = "?", desc = "spark: move the last (or a given) edit onto git stash" })

command("SparkShow", function(o)
  spark().show(o.args)
end, { nargs = "?", desc = "spark: show an edit's diff" })

command("SparkLog", function()
  spark().log()
end, { desc = "spark: list this repository's edits" })

command("SparkStatus", function()
  spark().status()
end, { desc = "spark: the daemon's status" })
