-- Headless Neovim 0.11 against `tinymorph lsp`, with nothing but Neovim's built-in LSP client.
-- Run by tests/test_nvim_lsp.py:  nvim --headless -u NONE -c "luafile tests/nvim_lsp/hint.lua"
-- Environment: TINYMORPH_CMD (JSON list), TINYMORPH_WORKDIR, TINYMORPH_RESULT (JSON report path).
-- Exits with :cquit (non-zero) on any failure; the report says which step failed.
local env = vim.env
local report = { steps = {} }
local timeout = 90000

local function write_report()
  local f = assert(io.open(env.TINYMORPH_RESULT, "w"))
  f:write(vim.json.encode(report))
  f:close()
end

local function step(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  table.insert(report.steps, { name = name, ok = ok })
  if not ok then
    report.error = name .. ": " .. tostring(err)
    write_report()
    io.stderr:write("FAILED " .. report.error .. "\n")
    vim.cmd("cquit 1")
  end
end

local buf, client

local function wait_for(what, fn)
  local value
  local ok = vim.wait(timeout, function()
    assert(client and not client:is_stopped(), "the server exited while waiting for " .. what)
    value = fn()
    return value ~= nil and value ~= false
  end, 50)
  assert(ok, "timed out waiting for " .. what)
  return value
end

local function exec(command, arguments)
  local response = client:request_sync("workspace/executeCommand",
    { command = command, arguments = arguments or {} }, timeout, buf)
  assert(response and not response.err, command .. ": " .. vim.inspect(response))
  return response.result
end

-- The hint computed for the buffer's current version (a stale one may linger until the refresh).
local function current_hint()
  local hints = vim.lsp.inlay_hint.get({ bufnr = buf })
  local hint = hints[1] and hints[1].inlay_hint
  if not hint or type(hint.data) ~= "table" or hint.data.version ~= vim.lsp.util.buf_versions[buf] then
    return nil
  end
  return hint
end

step("start and attach", function()
  vim.cmd.edit(vim.fs.joinpath(env.TINYMORPH_WORKDIR, "story.md"))
  buf = vim.api.nvim_get_current_buf()
  local id = vim.lsp.start({
    name = "tinymorph",
    cmd = vim.json.decode(env.TINYMORPH_CMD),
    root_dir = env.TINYMORPH_WORKDIR,
    init_options = { debounceMs = 50, maxTokens = 8, stop = "paragraph" },
  }, { bufnr = buf })
  assert(id, "vim.lsp.start returned nil")
  client = vim.lsp.get_client_by_id(id)
  vim.lsp.inlay_hint.enable(true, { bufnr = buf })
end)

step("server ready", function()
  report.status = wait_for("state ready", function()
    local st = exec("tinymorph.status")
    assert(st.state ~= "error", "server error: " .. tostring(st.message))
    return st.state == "ready" and st or nil
  end)
  local caps = client.server_capabilities
  report.offset_encoding = client.offset_encoding
  report.capabilities = { inlay = caps.inlayHintProvider ~= nil, inline = caps.inlineCompletionProvider ~= nil }
end)

step("type and see the hint", function()
  vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes("iOnce upon a time, ünïcode 😀 and<Esc>", true, false, true),
    "xt", false)
  report.typed = table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n")
  local hint = wait_for("inlay hint for the current version", current_hint)
  local label = hint.label
  if type(label) == "table" then
    local parts = {}
    for _, p in ipairs(label) do
      table.insert(parts, p.value)
    end
    label = table.concat(parts)
  end
  report.label = label
  report.position = hint.position
  report.version = hint.data.version
  report.line_length = #vim.api.nvim_buf_get_lines(buf, 0, 1, false)[1]
end)

step("inline completion at the cursor", function()
  local line = vim.api.nvim_buf_get_lines(buf, 0, 1, false)[1]
  local params = {
    textDocument = { uri = vim.uri_from_bufnr(buf) },
    position = report.position,
    context = { triggerKind = 1 },
  }
  local response = client:request_sync("textDocument/inlineCompletion", params, timeout, buf)
  assert(response and not response.err, vim.inspect(response))
  report.inline_items = response.result.items
  report.line = line
end)

step("accept the suggestion", function()
  local before = table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n")
  local result = exec("tinymorph.accept", { vim.uri_from_bufnr(buf) })
  report.accept = result
  report.after_accept = wait_for("text inserted", function()
    local now = table.concat(vim.api.nvim_buf_get_lines(buf, 0, -1, false), "\n")
    return now ~= before and now or nil
  end)
end)

report.ok = true
write_report()
vim.cmd("qall!")
