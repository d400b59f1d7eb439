-- Unit checks of the plugin's pure parts (config merge, state → statusline, command helpers),
-- no server needed. Run by tests/test_nvim_plugin.py; exits non-zero with the failure on stderr.
vim.opt.rtp:prepend(vim.env.TINYMORPH_PLUGIN_DIR)

local failures = {}
local function check(name, got, want)
  if not vim.deep_equal(got, want) then
    table.insert(failures, string.format("%s: got %s, want %s", name, vim.inspect(got), vim.inspect(want)))
  end
end

-- config
local config = require("tinymorph.config")
local merged = config.merge({ cmd = "mytinymorph", filetypes = { "markdown" }, keymaps = { dismiss = false } })
check("string cmd gets lsp", merged.cmd, { "mytinymorph", "lsp" })
check("filetypes replace", merged.filetypes, { "markdown" })
check("keymaps merge", { merged.keymaps.accept, merged.keymaps.dismiss }, { "<M-l>", false })
check("~ expands", config.merge({ cmd = { "~/bin/tm", "lsp" } }).cmd[1], vim.fn.expand("~/bin/tm"))
local venv = vim.fn.tempname()
vim.fn.mkdir(venv .. "/bin", "p")
vim.fn.writefile({ "#!/bin/sh" }, venv .. "/bin/tinymorph")
vim.fn.setfperm(venv .. "/bin/tinymorph", "rwxr-xr-x")
check("venv folder → bin/tinymorph", config.merge({ cmd = { venv, "lsp" } }).cmd, { venv .. "/bin/tinymorph", "lsp" })

-- state and statusline
local state = require("tinymorph.state")
state.reset()
check("starting", state.statusline(), "tinymorph starting")
state.on_progress({ kind = "begin", title = "Loading model", percentage = 0 })
state.on_progress({ kind = "report", percentage = 41.6 })
check("loading %", state.statusline(), "tinymorph loading 42%")
state.on_progress({ kind = "end" })
state.on_status({ state = "ready", model = "m", lastTtftMs = vim.NIL, steering = {} })
check("ready without ttft", state.statusline(), "tinymorph ready")
state.on_edit("file:///a.md")
check("generating", state.statusline(), "tinymorph generating")
state.on_metrics({ uri = "file:///b.md", ttftMs = 50 })
check("other document keeps generating", state.state(), "generating")
state.on_metrics({ uri = "file:///a.md", ttftMs = 84.6, tokensPerSecond = 20 })
check("ready with ttft", state.statusline(), "tinymorph ready 85ms")
state.on_status({ steering = { { feature = "default:1", strength = 4, layer = 15 } } })
check("steer count", state.statusline(), "tinymorph ready 85ms steer:1")
check("format entry", state.format_steering_entry({ feature = "x:2", strength = -1.5, mode = "clamp" }), "x:2 -1.5 clamp")
state.on_metrics({ uri = "file:///a.md", ttftMs = 1530 })
check("seconds", state.statusline(), "tinymorph ready 1.5s steer:1")
state.on_status({ state = "disabled" })
state.on_edit("file:///a.md")
check("off ignores edits", state.statusline(), "tinymorph off steer:1")
state.generating_timeout_ms = 0
state.on_status({ state = "ready" })
state.on_edit("file:///a.md")
vim.wait(5)
check("generating expires", state.state(), "ready")

-- command helpers
local commands = require("tinymorph.commands")
check("feature line", commands.format_feature({ id = "default:3", label = "sea words", topTokens = { " sea" } }), "sea words  [default:3]")
check("unlabelled feature", commands.format_feature({ id = "default:4", topTokens = { " sea", "\n" } }), '[default:4]  top: " sea" "\\n"')
local lines = commands.compare_lines({ steered = "A\nB", unsteered = "C" }, {})
check("compare has both", { lines[#lines - 4], lines[#lines] }, { "B", "C" })

-- setup registers the command even without a server running
require("tinymorph").setup({ cmd = { "/nonexistent/tinymorph", "lsp" } })
check(":Tinymorph exists", vim.fn.exists(":Tinymorph"), 2)

if #failures > 0 then
  io.stderr:write(table.concat(failures, "\n") .. "\n")
  vim.cmd("cquit 1")
end
vim.cmd("qall!")
