#!/bin/sh
# /init of vmpilot's bundled guest (busybox ash, PID 1, straight from the initramfs).
# Options on the kernel command line:
#   vmpilot.pd=poweroff   (default) the ACPI power button powers the guest off
#   vmpilot.pd=ignore     the button press is logged and ignored
#   vmpilot.pd=none       button.ko is not loaded: the event never reaches the guest
#   vmpilot.exit=N        exit QEMU with status (N<<1)|1 through isa-debug-exit
#                         (x86 only; needs -device isa-debug-exit,iobase=0xf4,iosize=4)
#   vmpilot.run=CMD       run CMD before the shell ('+' stands for a space)
#   vmpilot.share=TYPE:TAG:ro|rw:PATH   mount a host directory (virtiofs or 9p) at
#                         PATH (%XX-escaped); vmpilot's MachineConfig(shares=...) adds these
# Drivers (lib/modules/RELEASE, with modules.dep and modules.alias) are loaded
# for the devices present; a NIC is configured by DHCP (busybox udhcpc).
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

pd=poweroff exitcode= run= shares=
for word in $(cat /proc/cmdline); do
  case $word in
    vmpilot.pd=*) pd=${word#*=} ;;
    vmpilot.exit=*) exitcode=${word#*=} ;;
    vmpilot.run=*) run=$(echo "${word#*=}" | tr + ' ') ;;
    vmpilot.share=*) shares="$shares ${word#*=}" ;;
  esac
done

# Drivers for the devices present, by their modalias (each module costs a
# signature check, tens of ms under TCG: only what is used is loaded). The
# bus drivers (virtio_pci, ata_piix, ...) come first: the devices they find
# (virtio's) are matched in a second round; disks behind a SCSI host need sd.
modalias() { cat "$@" 2>/dev/null | sort -u; }
if [ -d "/lib/modules/$(uname -r)" ]; then
  [ "$pd" != none ] && modprobe -qa evdev button
  modprobe -qa $(modalias /sys/bus/pci/devices/*/modalias /sys/bus/platform/devices/*/modalias)
  modprobe -qa $(modalias /sys/bus/virtio/devices/*/modalias)
  ls /sys/class/scsi_host/ 2>/dev/null | grep -q . && modprobe -qa sd_mod sr_mod
  # -device pvpanic (ACPI QEMU0001): a panic is reported to QEMU (GUEST_PANICKED)
  [ -e /sys/bus/acpi/devices/QEMU0001:00 ] && modprobe -qa pvpanic-mmio
fi

# Host directories: virtiofs, or 9p (trans=virtio), each at its path.
for share in $shares; do
  IFS=: read -r type tag mode path <<EOF
$share
EOF
  path=$(printf "$(echo "$path" | sed 's/%\(..\)/\\x\1/g')")
  opts=$mode
  [ "$type" = 9p ] && opts="$opts,trans=virtio,version=9p2000.L,msize=262144,cache=loose"
  mkdir -p "$path" && mount -t "$type" -o "$opts" "$tag" "$path" \
    || echo "vmpilot-guest: cannot mount the $type share $tag at $path"
done

# A NIC (user-mode networking): up, and configured by DHCP.
ip link set lo up
for dev in /sys/class/net/*; do
  iface=${dev##*/}
  [ "$iface" = lo ] && continue
  ip link set "$iface" up
  udhcpc -i "$iface" -s /etc/udhcpc.script -q -n -t 5 -T 1 >/dev/null 2>&1 \
    || echo "vmpilot-guest: no DHCP lease on $iface"
done

if [ -n "$exitcode" ]; then
  echo "vmpilot-guest: exiting QEMU with code $exitcode"
  /bin/ioport-exit "$exitcode"
fi

power_button() {
  if [ "$pd" = ignore ]; then
    echo "vmpilot-guest: power button ignored"
  else
    echo "vmpilot-guest: power button, powering off"
    sync
    poweroff -f
  fi
}

# The power button (button.ko) shows up as an input device named "Power
# Button"; evdev.ko gives it /dev/input/eventN. Reading one 24-byte
# struct input_event blocks until the button is pressed.
for dev in /sys/class/input/input*; do
  [ "$(cat "$dev/name" 2>/dev/null)" = "Power Button" ] || continue
  for ev in "$dev"/event*; do
    [ -e "$ev" ] || continue
    (
      while dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=1 2>/dev/null; do
        power_button
        # the release and sync events of an ignored press
        [ "$pd" = ignore ] && dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=3 2>/dev/null
      done
    ) &
  done
done

# --- aarch64 (QEMU's virt board, booted from a device tree) ---------------
# system_powerdown raises the GPIO line the device tree's gpio-keys node
# names (PL061 line 3); the cloud kernel has no gpio-keys driver, so
# /bin/gpio-wait (guest/gpiowait.py) waits for its rising edges instead. It
# says "armed" once the line is requested: only then is the guest ready, so
# no press made after the ready line is lost.
if [ -x /bin/gpio-wait ] && [ "$pd" != none ] && [ -e /proc/device-tree/gpio-keys ]; then
  for key in /proc/device-tree/gpio-keys/*/gpios; do
    [ -e "$key" ] || continue
    # gpios = <phandle line flags>, big-endian cells: the chip is the GPIO
    # controller whose device-tree node has that phandle
    phandle=$(od -An -tx1 -N4 "$key" | tr -d ' ')
    line=$((0x$(od -An -tx1 -j4 -N4 "$key" | tr -d ' ')))
    for chip in /sys/bus/gpio/devices/gpiochip*; do
      node=$(readlink -f "$chip/../of_node")
      [ "$(od -An -tx1 -N4 "$node/phandle" 2>/dev/null | tr -d ' ')" = "$phandle" ] || continue
      mkfifo /run/power-key
      /bin/gpio-wait "/dev/${chip##*/}" "$line" >/run/power-key &
      exec 3</run/power-key
      rm /run/power-key
      if read -r armed <&3 && [ "$armed" = armed ]; then
        ( while read -r _ <&3; do power_button; done ) &
      else
        echo "vmpilot-guest: cannot watch the power key (GPIO line $line of ${chip##*/})"
      fi
      exec 3<&-
    done
  done
fi
# --- end aarch64 ----------------------------------------------------------

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
  setsid cttyhack sh   # a controlling tty on the console: job control and ^C work
done
