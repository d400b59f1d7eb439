-- Drives the tinymorph Neovim plugin against a real `tinymorph lsp` server, headless.
-- Run by tests/test_nvim_plugin.py:  nvim --headless -u NONE -c "luafile tests/nvim/plugin_e2e.lua"
-- Environment:
--   TINYMORPH_PLUGIN_DIR  editor-clients/nvim
--   TINYMORPH_CMD         JSON list, the server command
--   TINYMORPH_SETTINGS    JSON object, setup{settings=...}
--   TINYMORPH_WORKDIR     folder for the markdown file
--   TINYMORPH_RESULT      where to write the JSON report (pytest asserts on it)
--   TINYMORPH_TIMEOUT_MS  per-step timeout (default 60000)
local env = vim.env
local timeout = tonumber(env.TINYMORPH_TIMEOUT_MS or "") or 60000
local report = { steps = {} }

local function write_report()
  local f = assert(io.open(env.TINYMORPH_RESULT, "w"))
  f:write(vim.json.encode(report))
  f:close()
end

local function step(name, fn)
  local t0 = vim.uv.hrtime()
  local ok, err = xpcall(fn, debug.traceback)
  table.insert(report.steps, { name = name, ok = ok, ms = (vim.uv.hrtime() - t0) / 1e6, err = (not ok) and err or nil })
  if not ok then
    report.error = name .. ": " .. tostring(err)
    write_report()
    io.stderr:write("FAILED " .. report.error .. "\n")
    vim.cmd("cquit 1")
  end
end

-- Waits until fn() returns a value; fails at once if the server process has exited.
local function wait_for(what, fn, ms)
  local value, exited
  local ok = vim.wait(ms or timeout, function()
    local st = require("tinymorph.state").get()
    exited = st.server_state == "stopped" or (st.server_state == "error" and st.message:find("exited") ~= nil)
    if exited then
      return true
    end
    value = fn()
    return value ~= nil and value ~= false
  end, 50)
  assert(not exited, "the server exited while waiting for " .. what .. " (see " .. vim.lsp.get_log_path() .. ")")
  assert(ok, "timed out waiting for " .. what)
  return value
end

local function buffer_text(buf)
  return table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n")
end

vim.opt.rtp:prepend(env.TINYMORPH_PLUGIN_DIR)
vim.cmd("filetype on")
-- Keep notifications in the report instead of hit-enter prompts.
report.messages = {}
vim.notify = function(msg, level)
  table.insert(report.messages, { msg = msg, level = level })
end

local tinymorph = require("tinymorph")
local buf, client

local function exec_sync(command, arguments)
  local response
  if vim.fn.has("nvim-0.11") == 1 then
    response = client:request_sync("workspace/executeCommand", { command = command, arguments = arguments or {} }, timeout, buf)
  else
    response = client.request_sync("workspace/executeCommand", { command = command, arguments = arguments or {} }, timeout, buf)
  end
  assert(response, command .. ": no response")
  assert(not response.err, command .. ": " .. vim.inspect(response.err))
  return response.result
end

-- The label of the hint computed for the buffer's current version (older hints stay on screen
-- until the server's refresh, so a stale one must not count).
local function hint_label()
  local hints = vim.lsp.inlay_hint.get({ bufnr = buf })
  if #hints == 0 then
    return nil
  end
  local hint = hints[1].inlay_hint
  local version = vim.lsp.util.buf_versions[buf]
  if type(hint.data) == "table" and hint.data.version and hint.data.version ~= version then
    return nil
  end
  local label = hint.label
  if type(label) == "table" then
    local parts = {}
    for _, part in ipairs(label) do
      table.insert(parts, part.value)
    end
    label = table.concat(parts)
  end
  return label
end

step("setup and attach", function()
  tinymorph.setup({
    cmd = vim.json.decode(env.TINYMORPH_CMD),
    settings = vim.json.decode(env.TINYMORPH_SETTINGS or "{}"),
  })
  vim.cmd.edit(vim.fs.joinpath(env.TINYMORPH_WORKDIR, "story.md"))
  buf = vim.api.nvim_get_current_buf()
  assert(vim.bo[buf].filetype == "markdown", "filetype is " .. vim.bo[buf].filetype)
  client = wait_for("client attach", function()
    return vim.lsp.get_clients({ bufnr = buf, name = "tinymorph" })[1]
  end)
  report.inlay_hints_enabled = vim.lsp.inlay_hint.is_enabled({ bufnr = buf })
  assert(report.inlay_hints_enabled, "inlay hints not enabled for the attached buffer")
  -- The hint's highlight: this window draws LspInlayHint as TinymorphSuggestion.
  local ns = vim.api.nvim_get_hl_ns({ winid = 0 })
  report.window_hint_highlight = ns > 0 and vim.api.nvim_get_hl(ns, { name = "LspInlayHint" }).link or vim.NIL
  -- A buffer the server is not attached to has no tinymorph statusline, and its window no namespace.
  vim.cmd("new")
  report.statusline_unattached = tinymorph.statusline()
  report.unattached_window_ns = vim.api.nvim_get_hl_ns({ winid = 0 })
  vim.cmd("close!")
end)

step("server ready", function()
  report.status = wait_for("state ready", function()
    local st = exec_sync("tinymorph.status")
    assert(st.state ~= "error", "server error: " .. tostring(st.message))
    return st.state == "ready" and st or nil
  end)
end)

step("type and get the hint", function()
  -- Typed keys in insert mode, like a user; Neovim sends them as didChange.
  local keys = vim.api.nvim_replace_termcodes("iOnce upon a time, the old king<Esc>", true, false, true)
  vim.api.nvim_feedkeys(keys, "xt", false)
  report.typed = buffer_text(buf)
  assert(report.typed == "Once upon a time, the old king", "typed text: " .. report.typed)
  report.hint = wait_for("inlay hint", function()
    local label = hint_label()
    return label and vim.trim((label:gsub("…$", ""))) ~= "" and label or nil
  end)
  report.hint_position = vim.lsp.inlay_hint.get({ bufnr = buf })[1].inlay_hint.position
  report.statusline_after_hint = wait_for("metrics in statusline", function()
    local line = tinymorph.statusline()
    return line:match("%d+m?s$") and line or nil
  end)
end)

step("accept next word with the keymap", function()
  local before = buffer_text(buf)
  -- Default accept_word key is <M-w>; run it from insert mode at the end of the text.
  vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes("A<M-w><Esc>", true, false, true), "xt", false)
  report.after_word = wait_for("word inserted", function()
    local now = buffer_text(buf)
    return now ~= before and now or nil
  end)
end)

step("accept the rest with :Tinymorph accept", function()
  local before = buffer_text(buf)
  report.hint_after_word = wait_for("hint for the rest", function()
    local label = hint_label()
    return label and vim.trim((label:gsub("…$", ""))) ~= "" and label or nil
  end)
  vim.cmd("messages clear")
  vim.cmd("Tinymorph accept")
  report.after_accept = wait_for("suggestion inserted", function()
    local now = buffer_text(buf)
    return now ~= before and now or nil
  end)
  -- Accepting is quiet: nothing on the command line (Neovim's default handler printed "Workspace edit …").
  report.messages_after_accept = vim.fn.execute("messages")
  report.cursor = vim.api.nvim_win_get_cursor(0)
  report.mode = vim.api.nvim_get_mode().mode
end)

step("steer", function()
  report.steering_before = exec_sync("tinymorph.steer.list")
  local hits = exec_sync("tinymorph.features.search", { env.TINYMORPH_FEATURE_QUERY or "", 5 })
  report.features = hits
  assert(type(hits) == "table" and #hits > 0, "features.search returned nothing")
  report.steered_feature = hits[1].id
  vim.cmd("Tinymorph steer " .. hits[1].id .. " 3.5")
  report.steering_after = wait_for("steering list to change", function()
    local list = exec_sync("tinymorph.steer.list")
    return #list > #report.steering_before and list or nil
  end)
  report.statusline_steered = wait_for("steer count in statusline", function()
    local line = tinymorph.statusline()
    return line:match("steer:1") and line or nil
  end)
  vim.cmd("Tinymorph steer clear")
  report.steering_cleared = wait_for("steering cleared", function()
    local list = exec_sync("tinymorph.steer.list")
    return #list == 0 and list or nil
  end)
end)

step("pick a feature", function()
  -- :Tinymorph features <query>: the picker's first item, at the strength the prompt offers
  local select, input = vim.ui.select, vim.ui.input
  vim.ui.select = function(items, _, on_choice)
    report.picked_feature = items[1].id
    on_choice(items[1], 1)
  end
  vim.ui.input = function(opts, on_confirm)
    report.strength_offered = opts.default
    on_confirm(opts.default)
  end
  vim.cmd("Tinymorph features " .. (env.TINYMORPH_FEATURE_QUERY or ""))
  report.steering_picked = wait_for("the picked feature steered", function()
    local list = exec_sync("tinymorph.steer.list")
    return #list > 0 and list or nil
  end)
  vim.ui.select, vim.ui.input = select, input
  vim.cmd("Tinymorph steer clear")
  wait_for("steering cleared", function()
    return #exec_sync("tinymorph.steer.list") == 0 or nil
  end)
end)

step("toggle off and on", function()
  vim.cmd("Tinymorph toggle off")
  report.toggled_off = wait_for("disabled", function()
    local st = exec_sync("tinymorph.status")
    return st.state == "disabled" and st.state or nil
  end)
  report.statusline_off = wait_for("statusline off", function()
    local line = tinymorph.statusline()
    return line:match("off") and line or nil
  end)
  vim.cmd("Tinymorph toggle on")
  report.toggled_on = wait_for("enabled again", function()
    local st = exec_sync("tinymorph.status")
    return st.state == "ready" and st.state or nil
  end)
end)

step("checkhealth", function()
  vim.cmd("checkhealth tinymorph")
  report.health = buffer_text(vim.api.nvim_get_current_buf())
  vim.cmd("bwipeout!")
end)

report.ok = true
write_report()
vim.cmd("qall!")
