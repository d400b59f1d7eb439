-- :checkhealth tinymorph — Neovim version, server executable, server answers.
local M = {}

local health = vim.health

-- Answers what the server may ask during the handshake. Every request needs a result or an error:
-- returning neither makes Neovim raise a Lua error (and a Press-ENTER prompt) in the middle of
-- :checkhealth. The server asks `window/workDoneProgress/create` while it loads the model.
local function answer_server_request(method, params)
  if method == "workspace/configuration" then
    local items = {}
    for i = 1, #((params or {}).items or {}) do
      items[i] = vim.NIL
    end
    return items, nil
  end
  if
    method == "window/workDoneProgress/create"
    or method == "workspace/inlayHint/refresh"
    or method == "client/registerCapability"
    or method == "client/unregisterCapability"
  then
    return vim.NIL, nil
  end
  return nil, vim.lsp.rpc.rpc_response_error(vim.lsp.protocol.ErrorCodes.MethodNotFound, method)
end

-- Starts the server briefly and performs the LSP initialize handshake; returns (result, error).
local function handshake(cmd, timeout_ms)
  local ok, rpc = pcall(vim.lsp.rpc.start, cmd, {
    notification = function() end,
    server_request = answer_server_request,
    on_error = function() end,
    on_exit = function() end,
  })
  if not ok or not rpc then
    return nil, "could not start: " .. tostring(rpc)
  end
  local done, result, err = false, nil, nil
  rpc.request("initialize", {
    processId = vim.fn.getpid(),
    rootUri = vim.NIL,
    capabilities = vim.lsp.protocol.make_client_capabilities(),
    clientInfo = { name = "tinymorph-checkhealth" },
  }, function(e, r)
    done, err, result = true, e, r
  end)
  vim.wait(timeout_ms, function()
    return done
  end, 50)
  if done and not err then
    rpc.notify("initialized", {})
    rpc.request("shutdown", nil, function()
      rpc.notify("exit", nil)
    end)
  end
  vim.defer_fn(function()
    if not rpc.is_closing() then
      rpc.terminate()
    end
  end, 2000)
  if not done then
    return nil, string.format("no answer to initialize within %d s", timeout_ms / 1000)
  end
  if err then
    return nil, "initialize failed: " .. (err.message or vim.inspect(err))
  end
  return result, nil
end

function M.check()
  health.start("tinymorph")

  local v = vim.version()
  local version = string.format("%d.%d.%d", v.major, v.minor, v.patch)
  if vim.fn.has("nvim-0.10") == 1 then
    health.ok("Neovim " .. version .. (vim.fn.has("nvim-0.11") == 1 and "" or " (0.11 recommended)"))
  else
    health.error("Neovim " .. version .. ": tinymorph needs 0.10+ (inlay hints, vim.lsp.start)")
    return
  end

  local tinymorph = require("tinymorph")
  local opts = tinymorph.options
  if not opts then
    health.warn('setup() was not called: add require("tinymorph").setup{} to your config')
    opts = require("tinymorph.config").merge({})
  end
  local program = opts.cmd[1]
  local exe = vim.fn.exepath(program)
  if exe == "" then
    health.error(
      "server executable not found: " .. program,
      { "pip install tinymorph (in a venv), then setup{ cmd = { '/path/to/venv/bin/tinymorph', 'lsp' } }" }
    )
    return
  end
  health.ok("server executable: " .. exe .. "  (cmd: " .. table.concat(opts.cmd, " ") .. ")")
  health.info("filetypes: " .. table.concat(opts.filetypes, ", "))

  local client = tinymorph.client()
  if client then
    local ok, res = pcall(function()
      if vim.fn.has("nvim-0.11") == 1 then
        return client:request_sync("workspace/executeCommand", { command = "tinymorph.status", arguments = {} }, 5000)
      end
      return client.request_sync("workspace/executeCommand", { command = "tinymorph.status", arguments = {} }, 5000)
    end)
    local response = ok and res or nil
    if response and response.result then
      local r = response.result
      local line = string.format("running server (client %d): state %s, model %s", client.id, r.state, r.model or "-")
      if r.state == "error" then
        health.error(line .. ": " .. (r.message or ""))
      else
        health.ok(line)
      end
    else
      health.warn("running server did not answer tinymorph.status: " .. vim.inspect(response and response.err or res))
    end
    return
  end

  local result, err = handshake(opts.cmd, 30000)
  if not result then
    health.error("server does not respond: " .. err, { "run `" .. table.concat(opts.cmd, " ") .. "` in a shell to see its error" })
    return
  end
  local caps = result.capabilities or {}
  local info = result.serverInfo and (result.serverInfo.name .. " " .. (result.serverInfo.version or "")) or "?"
  health.ok("server responds to initialize: " .. info)
  if caps.inlayHintProvider then
    health.ok("server provides inlay hints")
  else
    health.warn("server does not advertise inlayHintProvider")
  end
end

return M
