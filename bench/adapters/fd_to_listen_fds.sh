#!/bin/bash
# Circus gives a worker its shared socket as a descriptor number on the command
# line ($(circus.sockets.NAME)); drover's workers expect the systemd form
# (LISTEN_FDS=1, LISTEN_PID=<own pid>, socket at fd 3). This moves the socket
# to fd 3 and execs the worker with those variables (exec keeps the pid).
#   usage: fd_to_listen_fds.sh FD COMMAND [ARG...]
fd=$1
shift
if [ "$fd" != 3 ]; then
    exec 3<&"$fd" || exit 3
    exec {fd}<&-
fi
export LISTEN_FDS=1 LISTEN_PID=$$ LISTEN_FDNAMES=http
unset NOTIFY_SOCKET
exec "$@"
