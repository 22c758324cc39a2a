#!/bin/sh
# /init of vmpilot's bundled guest (busybox ash, PID 1, straight from the initramfs).
# Options on the kernel command line:
#   vmpilot.pd=poweroff   (default) the ACPI power button powers the guest off
#   vmpilot.pd=ignore     the button press is logged and ignored
#   vmpilot.pd=none       button.ko is not loaded: the event never reaches the guest
#   vmpilot.exit=N        exit QEMU with status (N<<1)|1 through isa-debug-exit
#                         (needs -device isa-debug-exit,iobase=0xf4,iosize=4)
#   vmpilot.run=CMD       run CMD before the shell ('+' stands for a space)
# qemu-ga, when the image has it, starts on the port org.qemu.guest_agent.0.
# the applets' symlinks (/bin/sh exists): the builder never runs busybox on the host
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp
mount -t devpts devpts /dev/pts
dmesg -n 1  # keep kernel messages off the console the tests read

pd=poweroff exitcode= run=
for word in $(cat /proc/cmdline); do
  case $word in
    vmpilot.pd=*) pd=${word#*=} ;;
    vmpilot.exit=*) exitcode=${word#*=} ;;
    vmpilot.run=*) run=$(echo "${word#*=}" | tr + ' ') ;;
  esac
done

# No modules.dep in the kernel package: /etc/modules lists "group module" in
# load order; a group is loaded only when it is useful (each insmod costs a
# signature check, tens of ms under TCG).
groups=""
[ "$pd" != none ] && groups="power"
grep -qs 0x1af4 /sys/bus/pci/devices/*/vendor && groups="$groups virtio"
[ -e /sys/bus/acpi/devices/QEMU0001:00 ] && groups="$groups panic"  # -device pvpanic
while read -r group module; do
  case " $groups " in *" $group "*) insmod "/lib/modules/$module.ko" 2>/dev/null ;; esac
done </etc/modules

if [ -n "$exitcode" ]; then
  echo "vmpilot-guest: exiting QEMU with code $exitcode"
  /bin/ioport-exit "$exitcode"
fi

# The power button (button.ko) shows up as an input device named "Power
# Button"; evdev.ko gives it /dev/input/eventN. Reading one 24-byte
# struct input_event blocks until the button is pressed.
for dev in /sys/class/input/input*; do
  [ "$(cat "$dev/name" 2>/dev/null)" = "Power Button" ] || continue
  for ev in "$dev"/event*; do
    [ -e "$ev" ] || continue
    (
      while dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=1 2>/dev/null; do
        if [ "$pd" = ignore ]; then
          echo "vmpilot-guest: power button ignored"
          dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=3 2>/dev/null
        else
          echo "vmpilot-guest: power button, powering off"
          sync
          poweroff -f
        fi
      done
    ) &
  done
done

# qemu-ga on the virtio-serial port named org.qemu.guest_agent.0. No udev
# here, so no /dev/virtio-ports/<name> link: find the vportNpM by its name.
if [ -x /usr/sbin/qemu-ga ]; then
  for port in /sys/class/virtio-ports/*; do
    [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
    mkdir -p /dev/virtio-ports
    ln -sf "../${port##*/}" /dev/virtio-ports/org.qemu.guest_agent.0
    /usr/sbin/qemu-ga -m virtio-serial -p "/dev/${port##*/}" -t /run -f /run/qemu-ga.pid \
      >/tmp/qemu-ga.log 2>&1 &
    echo "vmpilot-guest: agent started on /dev/${port##*/}"
  done
fi

[ -n "$run" ] && sh -c "$run"

# vmpilot.cmd=B64 (`vmpilot run -- CMD`): run the base64-encoded script B64
# instead of the shell, the console its controlling tty (Ctrl-C reaches CMD),
# then power off; the script reports CMD's exit status itself.
cmd=$(sed -n 's/.*vmpilot\.cmd=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$cmd" ]; then
  echo "$cmd" | base64 -d >/tmp/vmpilot-cmd.sh
  setsid cttyhack sh /tmp/vmpilot-cmd.sh
  sync
  poweroff -f
fi

echo "vmpilot-guest: ready, kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime)s"
export PS1='guest# '
while :; do
  setsid cttyhack sh   # a controlling tty on ttyS0: job control and ^C work
done
