-- Argo CD health check for kubetune.io/FineTuneJob (argocd-cm key:
-- resource.customizations.health.kubetune.io_FineTuneJob). Reads only what the operator
-- writes: status.state, status.message, status.progress, status.observedGeneration and
-- the EvaluationPassed condition (a failed evaluation gate is Degraded).
local hs = {status = "Progressing", message = "waiting for the kubetune operator"}
if obj.status == nil or obj.status.state == nil then
  return hs
end
local status = obj.status
local state = status.state
local message = status.message or ""
if status.observedGeneration ~= nil and obj.metadata ~= nil
    and obj.metadata.generation ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.message = "the operator has not seen the latest spec yet"
  return hs
end
local gate = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "EvaluationPassed" then
      gate = condition
    end
  end
end
if state == "Succeeded" and gate ~= nil and gate.status ~= "True" then
  -- The job finished and its artifact is kept, but it is not promoted: Degraded, so a
  -- sync wave that would ship the model stops here (docs/evaluation.md).
  hs.status = "Degraded"
  message = "not promoted: " .. (gate.message or gate.reason or "evaluation gate")
elseif state == "Succeeded" then
  hs.status = "Healthy"
elseif state == "Failed" or state == "Invalid" then
  hs.status = "Degraded"
elseif state == "Suspended" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
  local progress = status.progress
  if progress ~= nil and progress.totalSteps ~= nil and progress.totalSteps > 0 then
    message = string.format("%s (step %d/%d, %d%%)", message, progress.step or 0,
      progress.totalSteps, progress.percent or 0)
  end
end
hs.message = state .. ": " .. message
return hs
