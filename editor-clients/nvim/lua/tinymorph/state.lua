-- The client's view of the server: state, model, last TTFT, steering. Fed by the
-- `tinymorph/status` and `tinymorph/metrics` notifications, `$/progress` and our own edits.
local M = {}

-- How long "generating" lasts without hearing back (the server may decide not to suggest).
M.generating_timeout_ms = 20000

local function now_ms()
  return vim.uv.now()
end

function M.new()
  return {
    server_state = "starting", -- loading | ready | error | disabled | stopped | starting
    model = "",
    message = "",
    last_ttft_ms = nil,
    tokens_per_second = nil,
    progress = nil, -- percentage while loading
    steering = {},
    pending = {}, -- uri -> time of the edit awaiting a suggestion
  }
end

local s = M.new()

function M.get()
  return s
end

function M.reset()
  s = M.new()
end

local known = { loading = true, ready = true, error = true, disabled = true }

function M.on_status(payload)
  if type(payload) ~= "table" then
    return
  end
  if known[payload.state] then
    s.server_state = payload.state
    if payload.state ~= "loading" then
      s.progress = nil
    end
    if payload.state == "disabled" or payload.state == "error" then
      s.pending = {}
    end
  end
  if type(payload.model) == "string" then
    s.model = payload.model
  end
  if type(payload.message) == "string" then
    s.message = payload.message
  end
  if type(payload.lastTtftMs) == "number" then
    s.last_ttft_ms = payload.lastTtftMs
  end
  if type(payload.steering) == "table" then
    s.steering = payload.steering
  end
end

function M.on_metrics(m)
  if type(m) ~= "table" then
    return
  end
  if type(m.ttftMs) == "number" then
    s.last_ttft_ms = m.ttftMs
  end
  if type(m.tokensPerSecond) == "number" then
    s.tokens_per_second = m.tokensPerSecond
  end
  if type(m.steering) == "table" then
    s.steering = m.steering
  end
  if m.uri then
    s.pending[m.uri] = nil
  else
    s.pending = {}
  end
  -- A finished suggestion proves the model is loaded even if we missed the status notification.
  if s.server_state == "loading" or s.server_state == "starting" then
    s.server_state = "ready"
  end
end

function M.on_edit(uri)
  if s.server_state == "disabled" or s.server_state == "error" then
    return
  end
  s.pending[uri] = now_ms()
end

function M.on_settled(uri)
  s.pending[uri] = nil
end

--- `value` of a `$/progress` notification (WorkDoneProgressBegin/Report/End).
function M.on_progress(value)
  if type(value) ~= "table" then
    return
  end
  if value.kind == "end" then
    s.progress = nil
    if s.server_state == "loading" or s.server_state == "starting" then
      s.server_state = "ready"
    end
    return
  end
  if s.server_state == "starting" or s.server_state == "ready" then
    s.server_state = "loading"
  end
  if type(value.percentage) == "number" then
    s.progress = value.percentage
  end
  if value.message then
    s.message = value.message
  elseif value.kind == "begin" and value.title then
    s.message = value.title
  end
end

--- The client could not start the server (or it exited): the statusline says "error".
function M.on_client_error(message)
  s.server_state = "error"
  s.message = message or ""
  s.pending = {}
end

function M.on_stopped()
  s.server_state = "stopped"
  s.pending = {}
end

--- The displayed state: "generating" overlays "ready" while an edit awaits its suggestion.
function M.state()
  if s.server_state ~= "ready" then
    return s.server_state
  end
  local t = now_ms()
  for uri, since in pairs(s.pending) do
    if t - since > M.generating_timeout_ms then
      s.pending[uri] = nil
    else
      return "generating"
    end
  end
  return "ready"
end

function M.format_ms(ms)
  if type(ms) ~= "number" then
    return "-"
  end
  if ms < 1000 then
    return string.format("%dms", math.floor(ms + 0.5))
  end
  return string.format("%.1fs", ms / 1000)
end

function M.format_steering_entry(e)
  local text = string.format("%s %s%s", e.feature, (e.strength or 0) >= 0 and "+" or "", tostring(e.strength))
  if e.mode and e.mode ~= "add" then
    text = text .. " " .. e.mode
  end
  if e.layer then
    text = text .. " @L" .. e.layer
  end
  return text
end

--- Statusline text, e.g. "tinymorph ready 85ms", "tinymorph loading 42%", "tinymorph generating 85ms steer:2".
function M.statusline()
  local st = M.state()
  local detail = ""
  if st == "loading" and s.progress then
    detail = string.format(" %d%%", math.floor(s.progress + 0.5))
  elseif (st == "ready" or st == "generating") and s.last_ttft_ms then
    detail = " " .. M.format_ms(s.last_ttft_ms)
  end
  local steer = #s.steering > 0 and (" steer:" .. #s.steering) or ""
  local label = st == "disabled" and "off" or st
  return "tinymorph " .. label .. detail .. steer
end

--- Multi-line description for :Tinymorph status.
function M.describe()
  local lines = {
    "state: " .. M.state(),
    "model: " .. (s.model ~= "" and s.model or "-"),
    "last TTFT: " .. M.format_ms(s.last_ttft_ms),
  }
  if s.tokens_per_second then
    table.insert(lines, string.format("speed: %.1f tok/s", s.tokens_per_second))
  end
  if s.message ~= "" then
    table.insert(lines, "message: " .. s.message)
  end
  if #s.steering == 0 then
    table.insert(lines, "steering: none")
  else
    local parts = {}
    for _, e in ipairs(s.steering) do
      table.insert(parts, M.format_steering_entry(e))
    end
    table.insert(lines, "steering: " .. table.concat(parts, ", "))
  end
  return lines
end

return M
