-- tinymorph for Neovim >= 0.10: starts `tinymorph lsp`, shows its suggestion as an inlay hint,
-- and maps keys to the server's accept commands (the server answers with workspace/applyEdit).
local config = require("tinymorph.config")
local state = require("tinymorph.state")
local highlight = require("tinymorph.highlight")
local inline = require("tinymorph.inline")

local M = {}

M.name = "tinymorph"
M.options = nil

local augroup = vim.api.nvim_create_augroup("tinymorph", { clear = true })
-- Buffers whose next workspace/applyEdit comes from an accept we asked for: the cursor follows it.
local accepting = {}
-- Buffers we watch for edits (nvim_buf_attach), until the client detaches.
local attached = {}
-- Problems with the server process are said once (not once per buffer or per retry).
local said = {}

local has_011 = vim.fn.has("nvim-0.11") == 1

---------------------------------------------------------------------------
-- Client access and requests
---------------------------------------------------------------------------

--- The tinymorph client attached to `bufnr` (default current), else any running tinymorph client.
function M.client(bufnr)
  local clients = vim.lsp.get_clients({ name = M.name, bufnr = bufnr or vim.api.nvim_get_current_buf() })
  if #clients == 0 then
    clients = vim.lsp.get_clients({ name = M.name })
  end
  return clients[1]
end

local function request(client, method, params, handler, bufnr)
  if has_011 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

local function notify(msg, level)
  vim.notify("tinymorph: " .. msg, level or vim.log.levels.INFO)
end

local function notify_once(key, msg, level)
  if said[key] then
    return
  end
  said[key] = true
  notify(msg, level)
end

--- Runs a server command (workspace/executeCommand); `callback(result)` on success,
--- `finally()` after the answer either way.
function M.exec(command, arguments, callback, bufnr, finally)
  local client = M.client(bufnr)
  if not client then
    notify("no server running (is the buffer's filetype enabled? see :checkhealth tinymorph)", vim.log.levels.WARN)
    return false
  end
  request(client, "workspace/executeCommand", { command = command, arguments = arguments or {} }, function(err, result)
    if finally then
      finally()
    end
    if err then
      notify(command .. " failed: " .. (err.message or vim.inspect(err)), vim.log.levels.ERROR)
      return
    end
    if callback then
      callback(result)
    end
  end, bufnr)
  return true
end

local function refresh_statusline()
  vim.schedule(function()
    pcall(vim.cmd.redrawstatus)
    pcall(vim.api.nvim_exec_autocmds, "User", { pattern = "TinymorphStatus", modeline = false })
  end)
end

--- The tinymorph inlay hint shown in `bufnr` for its current version, if any.
local function current_hint(bufnr)
  if not (vim.api.nvim_buf_is_valid(bufnr) and vim.lsp.inlay_hint) then
    return nil
  end
  local version = vim.lsp.util.buf_versions[bufnr]
  for _, item in ipairs(vim.lsp.inlay_hint.get({ bufnr = bufnr })) do
    local client = vim.lsp.get_client_by_id(item.client_id)
    local data = item.inlay_hint.data
    if client and client.name == M.name and (type(data) ~= "table" or data.version == nil or data.version == version) then
      return item.inlay_hint
    end
  end
  return nil
end

---------------------------------------------------------------------------
-- Accept / dismiss
---------------------------------------------------------------------------

local accept_commands = {
  accept = "tinymorph.accept",
  word = "tinymorph.acceptWord",
  line = "tinymorph.acceptLine",
}

--- Accepts the whole suggestion (`what` = "accept"), its next word ("word") or next line ("line").
function M.accept(what)
  local bufnr = vim.api.nvim_get_current_buf()
  local command = accept_commands[what or "accept"] or accept_commands.accept
  accepting[bufnr] = true
  local sent = M.exec(command, { vim.uri_from_bufnr(bufnr) }, function(result)
    if type(result) == "table" and result.applied == false then
      notify("no suggestion to accept", vim.log.levels.INFO)
    end
  end, bufnr, function()
    accepting[bufnr] = nil
  end)
  if not sent then
    accepting[bufnr] = nil
  end
end

function M.accept_word()
  M.accept("word")
end

function M.accept_line()
  M.accept("line")
end

function M.dismiss()
  local bufnr = vim.api.nvim_get_current_buf()
  M.exec("tinymorph.dismiss", { vim.uri_from_bufnr(bufnr) }, nil, bufnr)
  state.on_settled(vim.uri_from_bufnr(bufnr))
  refresh_statusline()
end

-- Byte column of an LSP `character` offset on `line` in the client's position encoding.
local function byte_col(line, character, encoding)
  if encoding == "utf-8" then
    return math.min(character, #line)
  end
  local ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  if not ok then -- Neovim 0.10 signature: (str, index, use_utf16)
    ok, col = pcall(vim.str_byteindex, line, character, encoding == "utf-16")
  end
  return ok and col or #line
end

-- The end of the last edit for `uri` in a WorkspaceEdit, as (0-based row, LSP start, new text).
local function last_edit_for(edit, uri)
  local edits = {}
  if edit.changes and edit.changes[uri] then
    edits = edit.changes[uri]
  end
  for _, change in ipairs(edit.documentChanges or {}) do
    if change.textDocument and change.textDocument.uri == uri then
      vim.list_extend(edits, change.edits)
    end
  end
  return edits[#edits]
end

-- Moves the cursor to the end of the text an accept inserted (Neovim leaves it before an insertion at the cursor).
local function follow_edit(bufnr, edit, encoding)
  local e = last_edit_for(edit, vim.uri_from_bufnr(bufnr))
  if not e or vim.api.nvim_get_current_buf() ~= bufnr then
    return
  end
  local lines = vim.split(e.newText, "\n", { plain = true })
  local row = e.range.start.line + #lines - 1
  local col
  if #lines == 1 then
    local line = vim.api.nvim_buf_get_lines(bufnr, e.range.start.line, e.range.start.line + 1, false)[1] or ""
    col = byte_col(line, e.range.start.character, encoding) + #lines[1]
  else
    col = #lines[#lines]
  end
  local line_count = vim.api.nvim_buf_line_count(bufnr)
  if row >= line_count then
    return
  end
  pcall(vim.api.nvim_win_set_cursor, 0, { row + 1, col })
end

---------------------------------------------------------------------------
-- Handlers for the server's notifications
---------------------------------------------------------------------------

local function make_handlers()
  return {
    ["tinymorph/status"] = function(_, result)
      state.on_status(result)
      refresh_statusline()
    end,
    ["tinymorph/metrics"] = function(_, result)
      state.on_metrics(result)
      refresh_statusline()
    end,
    -- Applies the accept's edit quietly: Neovim's default handler prints "Workspace edit <label>"
    -- on the command line for every accept.
    ["workspace/applyEdit"] = function(_, params, ctx)
      if type(params) ~= "table" or type(params.edit) ~= "table" then
        return nil, vim.lsp.rpc.rpc_response_error(vim.lsp.protocol.ErrorCodes.InvalidParams, "no edit")
      end
      local client = vim.lsp.get_client_by_id(ctx.client_id)
      local encoding = client and client.offset_encoding or "utf-16"
      local ok, failure = pcall(vim.lsp.util.apply_workspace_edit, params.edit, encoding)
      if ok then
        for bufnr in pairs(accepting) do
          follow_edit(bufnr, params.edit, encoding)
        end
      end
      return { applied = ok, failureReason = (not ok) and tostring(failure) or nil }
    end,
  }
end

---------------------------------------------------------------------------
-- Attaching to buffers
---------------------------------------------------------------------------

local function map_keys(bufnr)
  local keys = M.options.keymaps or {}
  local actions = {
    accept = { M.accept, "Accept suggestion" },
    accept_word = { M.accept_word, "Accept next word of suggestion" },
    accept_line = { M.accept_line, "Accept next line of suggestion" },
    dismiss = { M.dismiss, "Dismiss suggestion" },
  }
  for name, action in pairs(actions) do
    local lhs = keys[name]
    if lhs and lhs ~= "" then
      vim.keymap.set({ "i", "n" }, lhs, function()
        action[1]()
      end, { buffer = bufnr, desc = "tinymorph: " .. action[2], silent = true })
    end
  end
end

local function show_highlight(bufnr)
  for _, win in ipairs(vim.fn.win_findbuf(bufnr)) do
    highlight.apply(win, true)
  end
end

local function on_attach(bufnr, client)
  if M.options.inlay_hints and vim.lsp.inlay_hint then
    vim.lsp.inlay_hint.enable(true, { bufnr = bufnr })
  end
  -- Neovim 0.12+: its built-in ghost text, with replies for older text dropped (inline.lua).
  if M.options.inline_completion and client then
    inline.enable(client, bufnr)
  end
  show_highlight(bufnr)
  map_keys(bufnr)
  if attached[bufnr] then
    return
  end
  attached[bufnr] = true
  -- Edits that insert text start a suggestion on the server (deletions do not): show
  -- "generating" until its metrics arrive, and redraw once more when that mark would expire.
  vim.api.nvim_buf_attach(bufnr, false, {
    on_bytes = function(_, buf, _, _, _, _, _, _, _, _, _, new_end_byte)
      if not attached[buf] then
        return true -- detach
      end
      if new_end_byte > 0 then
        state.on_edit(vim.uri_from_bufnr(buf))
        refresh_statusline()
        vim.defer_fn(refresh_statusline, state.generating_timeout_ms + 100)
      end
    end,
    on_detach = function(_, buf)
      attached[buf] = nil
    end,
  })
end

local function lsp_config()
  local opts = M.options
  return {
    name = M.name,
    cmd = opts.cmd,
    cmd_env = opts.cmd_env,
    filetypes = opts.filetypes,
    init_options = vim.deepcopy(opts.settings),
    settings = { tinymorph = vim.deepcopy(opts.settings) },
    handlers = make_handlers(),
    on_exit = function(code, signal)
      vim.schedule(function()
        if code ~= 0 and signal == 0 then
          local message = string.format("the server exited with code %d (%s); see :checkhealth tinymorph and %s",
            code, table.concat(opts.cmd, " "), vim.lsp.get_log_path())
          state.on_client_error(message)
          notify_once("exit", message, vim.log.levels.ERROR)
        else
          state.on_stopped()
        end
        refresh_statusline()
      end)
    end,
  }
end

-- Neovim 0.10: start (or reuse) the client on FileType for real files.
local function start_on_filetype()
  vim.api.nvim_create_autocmd("FileType", {
    group = augroup,
    pattern = M.options.filetypes,
    callback = function(ev)
      if vim.bo[ev.buf].buftype ~= "" then
        return
      end
      vim.lsp.start(lsp_config(), { bufnr = ev.buf })
    end,
  })
end

---------------------------------------------------------------------------
-- Public API
---------------------------------------------------------------------------

--- Whether the server command can run; says once (with the path tried) when it cannot.
local function check_server()
  local program = M.options.cmd[1]
  if program and vim.fn.executable(program) == 1 then
    return true
  end
  local message = string.format(
    "server not found: tried %s%s. Set cmd = { '/path/to/venv/bin/tinymorph', 'lsp' } (or the venv folder) in setup{}; see :help tinymorph-setup",
    tostring(program),
    (program and not program:find("/", 1, true)) and " on $PATH" or ""
  )
  state.on_client_error(message)
  notify_once("not-found:" .. tostring(program), message, vim.log.levels.ERROR)
  return false
end

function M.setup(opts)
  M.options = config.merge(opts)
  state.reset()
  said = {}
  vim.api.nvim_clear_autocmds({ group = augroup })
  highlight.setup(augroup)

  if vim.fn.has("nvim-0.10") ~= 1 then
    notify("needs Neovim 0.10 or newer (inlay hints)", vim.log.levels.ERROR)
    return
  end

  vim.api.nvim_create_autocmd("LspAttach", {
    group = augroup,
    callback = function(ev)
      local client = vim.lsp.get_client_by_id(ev.data.client_id)
      if client and client.name == M.name then
        on_attach(ev.buf, client)
      end
    end,
  })
  -- "generating" means "waiting for the suggestion": it ends when a hint for the buffer's current
  -- version arrives (the server kept a typed-ahead suggestion, or tokens started streaming).
  vim.api.nvim_create_autocmd("LspRequest", {
    group = augroup,
    callback = function(ev)
      local request = ev.data and ev.data.request
      if not (request and request.type == "complete" and request.method == "textDocument/inlayHint") then
        return
      end
      local client = vim.lsp.get_client_by_id(ev.data.client_id)
      if not (client and client.name == M.name) then
        return
      end
      vim.schedule(function()
        if current_hint(ev.buf) then
          state.on_settled(vim.uri_from_bufnr(ev.buf))
          refresh_statusline()
        end
      end)
    end,
  })
  vim.api.nvim_create_autocmd("LspDetach", {
    group = augroup,
    callback = function(ev)
      local client = vim.lsp.get_client_by_id(ev.data.client_id)
      if client and client.name == M.name then
        attached[ev.buf] = nil
        state.on_settled(vim.uri_from_bufnr(ev.buf))
      end
    end,
  })
  -- Model loading reports work-done progress; Neovim's default $/progress handler fires LspProgress.
  vim.api.nvim_create_autocmd("LspProgress", {
    group = augroup,
    callback = function(ev)
      local client = vim.lsp.get_client_by_id(ev.data.client_id)
      if client and client.name == M.name and ev.data.params then
        state.on_progress(ev.data.params.value)
        refresh_statusline()
      end
    end,
  })

  -- The suggestion's highlight follows the buffer a window shows.
  vim.api.nvim_create_autocmd("BufWinEnter", {
    group = augroup,
    callback = function(ev)
      highlight.apply(vim.api.nvim_get_current_win(), M.client_attached(ev.buf))
    end,
  })

  require("tinymorph.commands").register()
  if not check_server() then
    return
  end
  if has_011 and vim.lsp.config and vim.lsp.enable then
    vim.lsp.config(M.name, lsp_config())
    vim.lsp.enable(M.name)
  else
    start_on_filetype()
  end
end

--- Whether the tinymorph client is attached to `bufnr`.
function M.client_attached(bufnr)
  return #vim.lsp.get_clients({ name = M.name, bufnr = bufnr }) > 0
end

--- Statusline component: "tinymorph ready 85ms", "tinymorph loading 42%", ... for buffers the
--- server is attached to; "tinymorph error" in buffers of `filetypes` when the server could not
--- start; empty everywhere else.
function M.statusline(bufnr)
  if not M.options then
    return ""
  end
  -- Statusline plugins may call this with their own arguments (lualine passes its component).
  if type(bufnr) ~= "number" or bufnr == 0 then
    bufnr = vim.api.nvim_get_current_buf()
  end
  if M.client_attached(bufnr) then
    return state.statusline()
  end
  if state.get().server_state == "error" and vim.tbl_contains(M.options.filetypes, vim.bo[bufnr].filetype) then
    return "tinymorph error"
  end
  return ""
end

--- Turns suggestions on/off (`on` = nil toggles).
function M.toggle(on)
  return M.exec("tinymorph.toggle", on == nil and {} or { on }, function(result)
    if type(result) == "table" then
      notify("suggestions " .. (result.enabled and "on" or "off"))
    end
  end)
end

--- Replaces server settings at run time (same keys as setup's `settings`).
function M.set_settings(settings)
  M.options.settings = vim.tbl_extend("force", M.options.settings or {}, settings)
  for _, client in ipairs(vim.lsp.get_clients({ name = M.name })) do
    if has_011 then
      client:notify("workspace/didChangeConfiguration", { settings = { tinymorph = settings } })
    else
      client.notify("workspace/didChangeConfiguration", { settings = { tinymorph = settings } })
    end
  end
end

function M.status(callback)
  return M.exec("tinymorph.status", {}, function(result)
    state.on_status(result)
    refresh_statusline()
    if callback then
      callback(result)
    end
  end)
end

--- Runs a steering command; every one answers with the new steering list, which the statusline shows.
local function exec_steering(command, args, callback)
  return M.exec(command, args, function(list)
    state.on_status({ steering = list or {} })
    refresh_statusline()
    if callback then
      callback(list)
    end
  end)
end

function M.steer(feature, strength, extra, callback)
  local entry = vim.tbl_extend("force", extra or {}, { feature = feature, strength = strength })
  return exec_steering("tinymorph.steer.set", { entry }, callback)
end

function M.steer_remove(feature, callback)
  return exec_steering("tinymorph.steer.remove", { feature }, callback)
end

function M.steer_clear(callback)
  return exec_steering("tinymorph.steer.clear", {}, callback)
end

function M.steer_list(callback)
  return exec_steering("tinymorph.steer.list", {}, callback)
end

function M.features(query, callback, limit)
  return M.exec("tinymorph.features.search", { query or "", limit or 50 }, callback)
end

function M.compare(callback)
  local bufnr = vim.api.nvim_get_current_buf()
  return M.exec("tinymorph.steer.compare", { vim.uri_from_bufnr(bufnr) }, callback, bufnr)
end

return M
