-- Argo CD health check for kubetune.io/FineTuneSweep (argocd-cm key:
-- resource.customizations.health.kubetune.io_FineTuneSweep). Reads status.state,
-- status.message, status.counts and status.observedGeneration, written by the operator.
local hs = {status = "Progressing", message = "waiting for the kubetune operator"}
if obj.status == nil or obj.status.state == nil then
  return hs
end
local status = obj.status
if status.observedGeneration ~= nil and obj.metadata ~= nil
    and obj.metadata.generation ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.message = "the operator has not seen the latest spec yet"
  return hs
end
local state = status.state
if state == "Succeeded" then
  hs.status = "Healthy"
elseif state == "Failed" or state == "Invalid" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
local message = status.message or ""
local counts = status.counts
if counts ~= nil and counts.total ~= nil then
  message = string.format("%s (%d done, %d running of %d trials)", message,
    counts.done or 0, counts.running or 0, counts.total)
end
hs.message = state .. ": " .. message
return hs
