-- Defaults and option merging for require("tinymorph").setup{}.
local M = {}

M.defaults = {
  -- Server command: { "tinymorph", "lsp" }, or a venv's executable, e.g. { "~/.venv/bin/tinymorph", "lsp" }.
  cmd = { "tinymorph", "lsp" },
  filetypes = { "markdown", "text", "gitcommit", "rst", "tex", "mail" },
  -- Insert- and normal-mode keys in attached buffers; set a key to false to leave it unmapped.
  keymaps = {
    accept = "<M-l>",
    accept_word = "<M-w>",
    accept_line = "<M-j>",
    dismiss = "<M-e>",
  },
  -- Sent as initializationOptions and with workspace/didChangeConfiguration; keys as in the
  -- server's protocol (model, dtype, threads, debounceMs, maxTokens, stop, enabled, temperature,
  -- contextTokens, config). Unset keys keep the server's defaults / tinymorph.toml.
  settings = {},
  -- Show the suggestion as an inlay hint in attached buffers (Neovim 0.11 has no ghost-text UI).
  inlay_hints = true,
  -- Neovim 0.12+: also enable its built-in ghost text (vim.lsp.inline_completion) for tinymorph.
  inline_completion = true,
  -- Extra environment for the server process.
  cmd_env = nil,
}

-- Expands ~ in the program and accepts a virtual environment folder in its place.
local function expand_cmd(cmd)
  local out = {}
  for i, part in ipairs(cmd) do
    out[i] = i == 1 and vim.fn.expand(part) or part
  end
  local program = out[1]
  if program and vim.fn.isdirectory(program) == 1 then
    local exe = vim.fs.joinpath(program, "bin", "tinymorph")
    if vim.fn.executable(exe) == 1 then
      out[1] = exe
    end
  end
  return out
end

--- Merges user options over the defaults. `keymaps` and `settings` merge key by key.
function M.merge(opts)
  opts = opts or {}
  local merged = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts)
  -- Lists replace rather than merge (tbl_deep_extend would merge by index).
  if opts.cmd then
    merged.cmd = type(opts.cmd) == "string" and { opts.cmd, "lsp" } or vim.deepcopy(opts.cmd)
  end
  if opts.filetypes then
    merged.filetypes = vim.deepcopy(opts.filetypes)
  end
  merged.cmd = expand_cmd(merged.cmd)
  return merged
end

return M
