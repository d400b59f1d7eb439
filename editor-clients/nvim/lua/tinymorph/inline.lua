-- Neovim 0.12's built-in ghost text (`vim.lsp.inline_completion`) for tinymorph buffers.
--
-- 0.12 requests inline completions after a fixed 200 ms debounce, does not cancel requests in
-- flight and shows whatever reply arrives, even when the text changed meanwhile. tinymorph's server
-- answers a request only for the version it was sent for (a request whose document moved on gets
-- no items), but a reply can still be on its way while the user types: guard_replies drops such
-- replies on the client side by comparing the buffer's changedtick.
local M = {}

local METHOD = "textDocument/inlineCompletion"

--- Whether this Neovim has the built-in inline completion UI.
function M.available()
  return type(vim.lsp.inline_completion) == "table" and type(vim.lsp.inline_completion.enable) == "function"
end

--- Wraps `client.request` so that an inline-completion reply for a buffer that changed since the
--- request was sent arrives as an empty list.
function M.guard_replies(client)
  if client._tinymorph_guarded then
    return
  end
  client._tinymorph_guarded = true
  local request = client.request
  client.request = function(self, method, params, handler, bufnr)
    if method == METHOD and handler then
      local buf = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
      local tick = vim.api.nvim_buf_is_valid(buf) and vim.api.nvim_buf_get_changedtick(buf) or -1
      local inner = handler
      handler = function(err, result, ctx, cfg)
        if not err and (not vim.api.nvim_buf_is_valid(buf) or vim.api.nvim_buf_get_changedtick(buf) ~= tick) then
          result = { items = {} }
        end
        return inner(err, result, ctx, cfg)
      end
    end
    return request(self, method, params, handler, bufnr)
  end
end

--- Turns the built-in ghost text on for `bufnr` (Neovim 0.12+); returns whether it did.
function M.enable(client, bufnr)
  if not M.available() then
    return false
  end
  M.guard_replies(client)
  local ok = pcall(vim.lsp.inline_completion.enable, true, { bufnr = bufnr, client_id = client.id })
  return ok
end

return M
