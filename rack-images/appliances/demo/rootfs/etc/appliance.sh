#!/bin/sh
# Run by init and restarted if it exits: the appliance's program.
. /run/appliance.env
exec /bin/mcappliance --disk "$DISK" --name "$NAME" --ip "$IP" --port "$PORT" \
    --write-mbps "$WRITE_MBPS"
