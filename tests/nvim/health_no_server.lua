-- `:checkhealth tinymorph` when no tinymorph client is running: the health check starts the server
-- itself for an LSP handshake. The server asks `window/workDoneProgress/create` while it loads the
-- model; that request must get an answer (issue 12, Neovim 1: it ended in a Lua error and a
-- "Press ENTER" prompt). Run by tests/test_nvim_plugin.py; writes a JSON report.
local env = vim.env
vim.opt.rtp:prepend(env.TINYMORPH_PLUGIN_DIR)
local report = { notifications = {} }
vim.notify = function(msg, level)
  table.insert(report.notifications, { msg = msg, level = level })
end

require("tinymorph").setup({ cmd = vim.json.decode(env.TINYMORPH_CMD) })
report.clients_before = #vim.lsp.get_clients({ name = "tinymorph" })
local ok, err = pcall(vim.cmd, "checkhealth tinymorph")
report.checkhealth_ok = ok
report.checkhealth_error = ok and nil or tostring(err)
report.health = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
-- The handshake's server lives on for a moment (shutdown, exit): let its requests arrive and be answered.
vim.wait(4000, function()
  return false
end, 100)
report.errmsg = vim.v.errmsg
report.messages = vim.fn.execute("messages")

local f = assert(io.open(env.TINYMORPH_RESULT, "w"))
f:write(vim.json.encode(report))
f:close()
vim.cmd("qall!")
