-- Argo CD health check for weir.dev/StreamSnapshot (Lua 5.1, as Argo CD runs it).
--
-- The controller creates a StreamSnapshot once its savepoint has completed and writes
-- status.phase Completed right after (controller/src/lifecycle.rs, `record`); retention marks
-- it Disposing while it deletes the data, then deletes the object (controller/src/retention.rs).
-- There is no in-progress phase: a savepoint under way is recorded in the StreamJob's
-- status.savepointInProgress, not as a StreamSnapshot.
--   - No status.phase: Progressing (the controller has not written the status yet). A
--     StreamSnapshot imported by hand keeps no status until someone writes one (the
--     controller restores only from a Completed snapshot).
--   - Completed: Healthy ("<size> bytes at <path>").
--   - Failed: Degraded, with status.message.
--   - Disposing: Progressing (retention is deleting its data; the object goes next).
--   - Anything else: Unknown.

local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the controller to record the savepoint"
  return hs
end
local phase = status.phase
if phase == "Completed" then
  hs.status = "Healthy"
  local path = ""
  if obj.spec ~= nil and obj.spec.path ~= nil then
    path = " at " .. obj.spec.path
  end
  if status.sizeBytes ~= nil then
    hs.message = "savepoint of " .. string.format("%.0f", status.sizeBytes) .. " bytes" .. path
  else
    hs.message = "savepoint" .. path
  end
  return hs
end
if phase == "Failed" then
  hs.status = "Degraded"
  if status.message ~= nil and status.message ~= "" then
    hs.message = status.message
  else
    hs.message = "the savepoint failed"
  end
  return hs
end
if phase == "Disposing" then
  hs.status = "Progressing"
  hs.message = "retention is deleting the savepoint's data"
  return hs
end
hs.status = "Unknown"
hs.message = "unknown phase " .. tostring(phase)
return hs
