-- Argo CD health check for weir.dev/StreamJob (Lua 5.1, as Argo CD runs it).
--
-- Read from the controller (controller/src/status.rs), in this order:
--   1. No status, or status.observedGeneration below metadata.generation:
--      Progressing "waiting for the controller" (the controller has not seen this spec yet;
--      everything else in the status describes an older one).
--   2. phase Failed: Degraded, with the Degraded condition's message (JobFailed: the
--      coordinator's error).
--   3. Degraded condition True: Degraded, "<reason>: <message>". The controller sets it for
--      InvalidSpec, UpgradeRefused, UpgradeFailed, SavepointFailed (the job goes on running),
--      RollingBack and RolledBack (a new version failed to become ready; the job runs the
--      last stable spec), Restarting (the job restarts after a failure) and
--      CoordinatorUnreachable. The controller's own word wins over the phase: a job that
--      rolls back never reaches the spec in git, so it is Degraded, not Progressing.
--   4. phase Suspended: Suspended.
--   5. phase Finished: Healthy (a bounded job ended, its output committed).
--   6. Progressing condition True (Deploying, Upgrading, RollingBack, Suspending: a
--      stop-with-savepoint before a suspend): Progressing with its message.
--   7. phase Running with Ready True: Healthy, with the Ready message.
--   8. phase Created, Deploying, Upgrading, RollingBack, or Running not Ready (stopping):
--      Progressing, with the Ready condition's message.
--   9. Anything else (a phase this script does not know): Unknown.

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the controller"
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "waiting for the controller to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local ready = condition(status, "Ready")
local progressing = condition(status, "Progressing")
local degraded = condition(status, "Degraded")

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(degraded, message_of(ready, "the job failed"))
  return hs
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  if degraded.reason ~= nil and degraded.reason ~= "" then
    hs.message = degraded.reason .. ": " .. message_of(degraded, "")
  else
    hs.message = message_of(degraded, "degraded")
  end
  return hs
end
if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message_of(ready, "the job is suspended")
  return hs
end
if phase == "Finished" then
  hs.status = "Healthy"
  hs.message = message_of(ready, "the job finished")
  return hs
end
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = message_of(progressing, phase)
  return hs
end
if phase == "Running" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(ready, "the job runs")
  return hs
end
if phase == "Running" or phase == "Created" or phase == "Deploying" or phase == "Upgrading" or phase == "RollingBack" then
  hs.status = "Progressing"
  hs.message = message_of(ready, phase)
  return hs
end
hs.status = "Unknown"
hs.message = "unknown phase " .. tostring(phase)
return hs
