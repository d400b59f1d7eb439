-- Unit checks of the plugin's pure parts (config merge, state → statusline, command helpers),
-- no server needed. Run by tests/test_nvim_plugin.py; exits non-zero with the failure on stderr.
vim.opt.rtp:prepend(vim.env.TINYMORPH_PLUGIN_DIR)

local failures = {}
local function check(name, got, want)
  if not vim.deep_equal(got, want) then
    table.insert(failures, string.format("%s: got %s, want %s", name, vim.inspect(got), vim.inspect(want)))
  end
end

-- Everything runs inside xpcall: a Lua error fails the test at once instead of leaving Neovim waiting.
local function main()
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
check("prompt of a found concept", commands.select_prompt("wine", { { id = "default:1", readsQuery = true }, { id = "default:2", readsQuery = false } }), "steer towards:")
check("prompt when nothing reads it", commands.select_prompt(" dinosaurs ", { { id = "default:872", readsQuery = false } }),
  'no feature fires on "dinosaurs" itself (:Tinymorph steer dinosaurs describes it); steer towards:')
check("prompt of an old server", commands.select_prompt("sea", { { id = "default:3" } }), "steer towards:")
check("a feature turned down", commands.format_feature({ id = "default:5", label = "formal", suggestedStrength = -1 }),
  "formal  [default:5]  (turned down: -1)")
local asked = {}
local real_input = vim.ui.input
vim.ui.input = function(opts, _) table.insert(asked, opts.default) end
commands.ask_strength("default:5", -1)
commands.ask_strength("default:6", nil)
vim.ui.input = real_input
check("the strength offered is search's", asked, { "-1", "1" })
local lines = commands.compare_lines({ steered = "A\nB", unsteered = "C" }, {})
check("compare has both", { lines[#lines - 4], lines[#lines] }, { "B", "C" })

-- Issue 12 (Neovim 3): a wrong server path is said once, with the path tried; the statusline says error.
local notes = {}
local real_notify = vim.notify
vim.notify = function(msg, level)
  table.insert(notes, { msg = msg, level = level })
end
local wrong = "/home/me/tinymorph/.venv/bin/tinymorph"
local tinymorph = require("tinymorph")
tinymorph.setup({ cmd = { wrong, "lsp" } })
check(":Tinymorph exists", vim.fn.exists(":Tinymorph"), 2)
local dir = vim.fn.tempname()
vim.fn.mkdir(dir, "p")
vim.cmd("filetype on")
vim.cmd.edit(dir .. "/a.md")
local md = vim.api.nvim_get_current_buf()
vim.cmd.edit(dir .. "/b.md")
vim.wait(300)
check("no client for a missing server", #vim.lsp.get_clients({ name = "tinymorph" }), 0)
local about_path = vim.tbl_filter(function(n)
  return n.msg:find(wrong, 1, true) ~= nil
end, notes)
check("one message names the path tried", #about_path, 1)
check("and it is the only message", #notes, 1)
check("it is an error", notes[1] and notes[1].level, vim.log.levels.ERROR)
check("statusline in a buffer of the filetypes says error", tinymorph.statusline(md), "tinymorph error")

-- Issue 12 (Neovim 5): no statusline text in buffers the server is not (and would not be) attached to.
vim.cmd.enew()
local scratch = vim.api.nvim_get_current_buf()
check("statusline in an unrelated buffer", tinymorph.statusline(scratch), "")
state.reset()
state.on_status({ state = "ready" })
check("statusline in a markdown buffer without the client", tinymorph.statusline(md), "")
vim.notify = real_notify

-- Issue 12 (Neovim 2): TinymorphSuggestion, linked in true-colour terminals, italic + grey in cterm ones.
vim.o.termguicolors = false
require("tinymorph.highlight").define()
local hl = vim.api.nvim_get_hl(0, { name = "TinymorphSuggestion" })
check("cterm italic", hl.cterm and hl.cterm.italic, true)
check("cterm grey", type(hl.ctermfg) == "number" and hl.ctermfg ~= 0, true)
vim.o.termguicolors = true
vim.cmd("doautocmd OptionSet termguicolors")
local linked = vim.api.nvim_get_hl(0, { name = "TinymorphSuggestion" })
check("gui: linked", linked.link, "LspInlayHint")
local ns = require("tinymorph.highlight").namespace
check("hint group in tinymorph windows", vim.api.nvim_get_hl(ns, { name = "LspInlayHint" }).link, "TinymorphSuggestion")
vim.o.termguicolors = false
vim.cmd("doautocmd OptionSet termguicolors")
check("back to cterm", vim.api.nvim_get_hl(0, { name = "TinymorphSuggestion" }).cterm, { italic = true })

-- Issue 12 (Neovim 7): replies to textDocument/inlineCompletion for older text are dropped (0.12's
-- built-in ghost text has no version check of its own).
local guard = require("tinymorph.inline").guard_replies
local gbuf = vim.api.nvim_create_buf(false, true)
local calls = {}
local fake = {
  request = function(_, method, params, handler, bufnr)
    table.insert(calls, { method = method, handler = handler, bufnr = bufnr })
    return true, #calls
  end,
}
guard(fake)
local got = {}
fake:request("textDocument/inlineCompletion", {}, function(err, result)
  table.insert(got, result)
end, gbuf)
vim.api.nvim_buf_set_lines(gbuf, 0, -1, false, { "typed on" })
calls[1].handler(nil, { items = { { insertText = "old" } } }, { bufnr = gbuf }, {})
check("stale reply dropped", got[1], { items = {} })
fake:request("textDocument/inlineCompletion", {}, function(err, result)
  table.insert(got, result)
end, gbuf)
calls[2].handler(nil, { items = { { insertText = "fresh" } } }, { bufnr = gbuf }, {})
check("current reply kept", got[2], { items = { { insertText = "fresh" } } })
fake:request("textDocument/hover", {}, function(err, result)
  table.insert(got, result)
end, gbuf)
vim.api.nvim_buf_set_lines(gbuf, 0, -1, false, { "more" })
calls[3].handler(nil, "hover", {}, {})
check("other methods untouched", got[3], "hover")

-- Issue 12 (Neovim 6): :help tinymorph
local docdir = vim.fn.tempname()
vim.fn.mkdir(docdir .. "/doc", "p")
vim.fn.writefile(vim.fn.readfile(vim.env.TINYMORPH_PLUGIN_DIR .. "/doc/tinymorph.txt"), docdir .. "/doc/tinymorph.txt")
vim.cmd("helptags " .. docdir .. "/doc")
vim.opt.rtp:prepend(docdir)
for _, tag in ipairs({ "tinymorph", ":Tinymorph", "tinymorph-setup", "tinymorph-keys", "tinymorph-statusline",
  "tinymorph-health", "TinymorphSuggestion", "tinymorph.statusline()" }) do
  local found = pcall(vim.cmd.help, tag)
  check(":help " .. tag, found and vim.fn.expand("%:t") or nil, "tinymorph.txt")
  pcall(vim.cmd.helpclose)
end

end

local ok, err = xpcall(main, debug.traceback)
if not ok then
  table.insert(failures, "error: " .. tostring(err))
end
if #failures > 0 then
  io.stderr:write(table.concat(failures, "\n") .. "\n")
  vim.cmd("cquit 1")
end
vim.cmd("qall!")
