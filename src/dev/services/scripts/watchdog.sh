# Kills the services' process groups, and removes their folder, once the Node process that
# started them is gone without having called stop() (a crashed or SIGKILLed test run), so no
# orphan keeps a port or disk space. `kill -0` once a second is enough.
#
#   sh -c "$(cat watchdog.sh)" services-watchdog PARENT_PID PIDFILE [REMOVE_DIR]
#
# PIDFILE holds one "PID SIGNAL" line per server (each the leader of its own process group);
# SIGNAL is what stops it cleanly (SIGINT for postgres, SIGTERM for the others).
parent=$1; pidfile=$2; removedir=$3
while kill -0 "$parent" 2>/dev/null; do sleep 1; done
if [ -f "$pidfile" ]; then
  while read -r pid sig; do kill -s "${sig#SIG}" -- "-$pid" 2>/dev/null; done < "$pidfile"
  # Give them up to 5 s (25 x 0.2 s) to shut down cleanly, then SIGKILL what is left.
  i=0
  while [ $i -lt 25 ]; do
    alive=0
    while read -r pid sig; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done < "$pidfile"
    [ $alive -eq 0 ] && break
    sleep 0.2; i=$((i + 1))
  done
  while read -r pid sig; do kill -s KILL -- "-$pid" 2>/dev/null; done < "$pidfile"
fi
if [ -n "$removedir" ]; then rm -rf "$removedir"; fi
