-- Argo CD health check for humpback.dev/BacktranslationRun.
-- Argo CD sets the global `obj` (the live object) and reads `status` and `message` of the table
-- this returns. Embedded in argocd-cm.yaml beside this file (a test keeps the two equal).
--
--   status.phase Succeeded             -> Healthy
--   status.phase Failed                -> Degraded
--   condition Accepted False           -> Degraded (the operator refused the spec)
--   status.phase Suspended             -> Suspended (spec.suspend: true)
--   Pending, Running, anything else    -> Progressing
--   no status yet, or a status older
--   than the spec (observedGeneration) -> Progressing
local hs = {}

local function nonempty(s)
  return s ~= nil and s ~= ""
end

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

-- status.message, else the message of the condition that explains the state, else `fallback`.
local function message(status, ctype, fallback)
  if nonempty(status.message) then
    return status.message
  end
  local c = condition(status, ctype)
  if c ~= nil and nonempty(c.message) then
    return c.message
  end
  return fallback
end

local status = obj.status
if status == nil or (status.phase == nil and status.conditions == nil) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on the spec change (generation " .. tostring(generation) .. ")"
  return hs
end

local accepted = condition(status, "Accepted")
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = message(status, "Accepted", "The operator did not accept the spec")
  return hs
end

local progress = ""
if nonempty(status.progress) then
  progress = " (" .. status.progress .. " stages)"
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message(status, "Complete", "Succeeded" .. progress)
elseif status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message(status, "Failed", "Failed" .. progress)
elseif status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message(status, "Suspended", "Suspended" .. progress)
elseif nonempty(status.stage) then
  hs.status = "Progressing"
  hs.message = message(status, "Running", "Running " .. status.stage .. progress)
else
  hs.status = "Progressing"
  hs.message = message(status, "Running", (status.phase or "Pending") .. progress)
end
return hs
