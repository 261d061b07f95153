#!/bin/sh
# An example for `tests/kernel/run --guest-script tests/kernel/examples/cli-migrate.sh`:
# runs in the guest (busybox sh) with vfio-mig on PATH and the mtty devices in MTTY_A, MTTY_B
# (mtty-2), MTTY_C, MTTY_D (mtty-1); EDU_BDF is set in the iommu boot. The exit status decides.
set -e
echo "guest script: A=$MTTY_A B=$MTTY_B C=$MTTY_C D=$MTTY_D EDU=${EDU_BDF:-none}"
vfio-mig probe "$MTTY_A"
vfio-mig --open-mode cdev migrate "$MTTY_A" "$MTTY_B"
# Two devices at once, group path.
vfio-mig --open-mode group migrate "$MTTY_A,$MTTY_C" "$MTTY_B,$MTTY_D"
# An mtty-2 state does not fit an mtty-1: this must fail.
if vfio-mig migrate "$MTTY_A" "$MTTY_C"; then
    echo "guest script: an mtty-2 was migrated into an mtty-1" >&2
    exit 1
fi
echo "guest script: done"
