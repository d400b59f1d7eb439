-- The TinymorphSuggestion highlight and where it is used.
--
-- Neovim draws every inlay hint with `LspInlayHint` (0.12's ghost text with `ComplHint`), and in a
-- terminal without 'termguicolors' (default tmux) that group can look exactly like typed text. So:
-- TinymorphSuggestion links to LspInlayHint when true colours are on, and is italic + grey
-- (cterm) otherwise; windows that show a tinymorph buffer get a highlight namespace in which
-- LspInlayHint and ComplHint are TinymorphSuggestion (other groups fall back to the global ones).
local M = {}

M.group = "TinymorphSuggestion"
M.namespace = vim.api.nvim_create_namespace("tinymorph.highlight")

-- What we defined last, so that a user's own definition is never overwritten.
local ours

local function spec()
  if vim.o.termguicolors then
    return { link = "LspInlayHint" }
  end
  -- 244: mid grey on 256-colour terminals; 8 ("bright black") is grey on 16-colour ones.
  local colors = tonumber(vim.fn.eval("&t_Co")) or 8
  return { cterm = { italic = true }, ctermfg = colors >= 256 and 244 or 8, italic = true }
end

--- Defines TinymorphSuggestion (again after a colour scheme or 'termguicolors' change).
function M.define()
  local current = vim.api.nvim_get_hl(0, { name = M.group, link = true })
  local user_defined = next(current) ~= nil and not (ours and vim.deep_equal(current, ours))
  if user_defined then
    return
  end
  vim.api.nvim_set_hl(0, M.group, spec())
  ours = vim.api.nvim_get_hl(0, { name = M.group, link = true })
  vim.api.nvim_set_hl(M.namespace, "LspInlayHint", { link = M.group })
  vim.api.nvim_set_hl(M.namespace, "ComplHint", { link = M.group })
end

--- Uses the namespace in `win` while it shows a tinymorph buffer (`on`), and drops it otherwise.
--- A namespace the user set on the window is left alone.
function M.apply(win, on)
  if not vim.api.nvim_win_is_valid(win) then
    return
  end
  local current = vim.api.nvim_get_hl_ns({ winid = win })
  if on and (current == -1 or current == 0) then
    vim.api.nvim_win_set_hl_ns(win, M.namespace)
  elseif not on and current == M.namespace then
    vim.api.nvim_win_set_hl_ns(win, 0)
  end
end

--- Keeps the definition across colour schemes and 'termguicolors' changes.
function M.setup(augroup)
  M.define()
  vim.api.nvim_create_autocmd("ColorScheme", { group = augroup, callback = M.define })
  vim.api.nvim_create_autocmd("OptionSet", { group = augroup, pattern = "termguicolors", callback = M.define })
end

return M
