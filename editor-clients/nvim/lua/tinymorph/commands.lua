-- :Tinymorph user command: toggle | status | accept [word|line] | dismiss | steer … | features <query> | compare
local M = {}

local function tm()
  return require("tinymorph")
end

local function echo(lines, level)
  if type(lines) == "string" then
    lines = { lines }
  end
  vim.notify(table.concat(lines, "\n"), level or vim.log.levels.INFO)
end

local function format_list(list)
  local st = require("tinymorph.state")
  if type(list) ~= "table" or #list == 0 then
    return { "steering: none" }
  end
  local lines = { "steering:" }
  for _, e in ipairs(list) do
    table.insert(lines, "  " .. st.format_steering_entry(e))
  end
  return lines
end

-- Sets one steering entry and shows the new list. Says so first: the server calibrates strength 1 of
-- a feature it has not seen (~20 s on a laptop CPU), and a prompt that closes with nothing to show
-- for that long reads as a hang.
local function steer(feature, strength, extra)
  echo("steering by " .. feature .. "… (a new one is calibrated first, ~20 s)")
  tm().steer(feature, strength, extra, function(list)
    echo(format_list(list))
  end)
end

-- Last search results, for completing feature ids after `:Tinymorph steer `.
local known_features = {}

--- One line per search hit: "label  [id]", or "[id]  top: a b c" for an unlabelled feature
--- (labels already name the tokens a feature fires on and promotes; one line must stay short).
function M.format_feature(hit)
  local down = (hit.suggestedStrength or 1) < 0 and string.format("  (turned down: %g)", hit.suggestedStrength) or ""
  if hit.label and hit.label ~= "" then
    return string.format("%s  [%s]%s", hit.label, hit.id, down)
  end
  local tokens = {}
  for i, t in ipairs(hit.topTokens or {}) do
    if i > 6 then
      break
    end
    table.insert(tokens, (vim.inspect(t)))
  end
  return string.format("[%s]  top: %s%s", hit.id, #tokens > 0 and table.concat(tokens, " ") or "-", down)
end

--- Asks for a strength, `default` offered (search's `suggestedStrength`: -1 for "less hedging").
function M.ask_strength(feature, default)
  local prompt = "strength for " .. feature .. " (1 = calibrated, negative suppresses): "
  vim.ui.input({ prompt = prompt, default = string.format("%g", default or 1) }, function(input)
    local strength = tonumber(input or "")
    if not strength or strength == 0 then
      if input and input ~= "" then
        echo("not a usable strength: " .. input, vim.log.levels.WARN)
      end
      return
    end
    steer(feature, strength, nil)
  end)
end

--- The picker's prompt: says when no hit fires on the query's own words (`readsQuery` false on all:
--- the SAE likely has no feature for it) and how to steer by the description instead.
function M.select_prompt(query, hits)
  local q = vim.trim(query or "")
  if q == "" or #hits == 0 then
    return "steer towards:"
  end
  for _, hit in ipairs(hits) do
    if hit.readsQuery ~= false then
      return "steer towards:"
    end
  end
  return string.format('no feature fires on "%s" itself (:Tinymorph steer %s describes it); steer towards:', q, q)
end

--- Searches features, lets the user pick one (vim.ui.select: Telescope/fzf-lua pickers plug in here)
--- and asks for its strength.
function M.pick_feature(query)
  tm().features(query, function(hits)
    hits = hits or {}
    for _, hit in ipairs(hits) do
      known_features[hit.id] = true
    end
    if #hits == 0 then
      echo("no feature matches " .. vim.inspect(query or ""), vim.log.levels.WARN)
      return
    end
    vim.ui.select(hits, { prompt = M.select_prompt(query, hits), format_item = M.format_feature }, function(hit)
      if hit then
        M.ask_strength(hit.id, hit.suggestedStrength)
      end
    end)
  end)
end

--- Lines of the compare scratch buffer.
function M.compare_lines(result, steering)
  local lines = { "# tinymorph: steered vs unsteered", "" }
  vim.list_extend(lines, format_list(steering))
  vim.list_extend(lines, { "", "## Steered", "" })
  vim.list_extend(lines, vim.split(result.steered or "", "\n", { plain = true }))
  vim.list_extend(lines, { "", "## Unsteered", "" })
  vim.list_extend(lines, vim.split(result.unsteered or "", "\n", { plain = true }))
  if result.steered == result.unsteered then
    vim.list_extend(lines, { "", "(identical: try a larger strength or another feature)" })
  end
  return lines
end

local function show_compare(result)
  local steering = require("tinymorph.state").get().steering
  local buf = vim.api.nvim_create_buf(false, true)
  -- buftype=nofile before filetype: tinymorph only attaches to buffers of real files.
  vim.bo[buf].buftype = "nofile"
  vim.bo[buf].bufhidden = "wipe"
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, M.compare_lines(result, steering))
  vim.bo[buf].modifiable = false
  vim.bo[buf].filetype = "markdown"
  pcall(vim.api.nvim_buf_set_name, buf, "tinymorph://compare/" .. buf)
  vim.cmd("vsplit")
  vim.api.nvim_win_set_buf(0, buf)
end

local subcommands = {}

subcommands.toggle = function(args)
  local on = nil
  if args[1] == "on" then
    on = true
  elseif args[1] == "off" then
    on = false
  end
  tm().toggle(on)
end

subcommands.status = function()
  tm().status(function()
    echo(require("tinymorph.state").describe())
  end)
end

subcommands.accept = function(args)
  tm().accept(args[1] or "accept")
end

subcommands.dismiss = function()
  tm().dismiss()
end

subcommands.steer = function(args)
  local first = args[1]
  if first == nil or first == "list" then
    tm().steer_list(function(list)
      echo(format_list(list))
    end)
  elseif first == "clear" then
    tm().steer_clear(function()
      echo("steering cleared")
    end)
  elseif first == "remove" and args[2] then
    tm().steer_remove(args[2], function(list)
      echo(format_list(list))
    end)
  else
    -- <feature or description words...> [strength] [add|clamp|ablate] [layer]
    local at = nil
    for i = 2, #args do
      if tonumber(args[i]) then
        at = i
        break
      end
    end
    local feature = table.concat(args, " ", 1, (at or (#args + 1)) - 1)
    local strength = at and tonumber(args[at]) or 1
    local extra = {}
    if at and args[at + 1] then
      extra.mode = args[at + 1]
    end
    if at and args[at + 2] then
      extra.layer = tonumber(args[at + 2])
    end
    if feature == "" then
      echo("usage: :Tinymorph steer <feature id or description> [strength] [add|clamp|ablate] [layer]",
        vim.log.levels.ERROR)
      return
    end
    steer(feature, strength, extra)
  end
end

subcommands.features = function(args)
  M.pick_feature(table.concat(args, " "))
end

subcommands.compare = function()
  tm().compare(function(result)
    if type(result) == "table" then
      show_compare(result)
    end
  end)
end

local function complete(arg_lead, cmdline)
  local words = vim.split(cmdline, "%s+", { trimempty = true })
  local completing_new = cmdline:match("%s$") ~= nil
  local index = #words + (completing_new and 1 or 0) -- position of the word being completed
  local candidates = {}
  if index == 2 then
    candidates = vim.tbl_keys(subcommands)
    table.sort(candidates)
  elseif index == 3 and words[2] == "steer" then
    candidates = { "list", "clear", "remove" }
    vim.list_extend(candidates, vim.tbl_keys(known_features))
  elseif index == 3 and words[2] == "accept" then
    candidates = { "word", "line" }
  elseif index == 3 and words[2] == "toggle" then
    candidates = { "on", "off" }
  elseif index == 5 and words[2] == "steer" then
    candidates = { "add", "clamp", "ablate" }
  end
  return vim.tbl_filter(function(c)
    return vim.startswith(c, arg_lead)
  end, candidates)
end

function M.run(opts)
  local args = vim.deepcopy(opts.fargs)
  local name = table.remove(args, 1) or "status"
  local fn = subcommands[name]
  if not fn then
    echo("unknown subcommand " .. name .. " (try :Tinymorph <Tab>)", vim.log.levels.ERROR)
    return
  end
  fn(args)
end

function M.register()
  vim.api.nvim_create_user_command("Tinymorph", M.run, {
    nargs = "*",
    complete = complete,
    desc = "tinymorph: toggle | status | accept [word|line] | dismiss | steer … | features <query> | compare",
  })
end

return M
