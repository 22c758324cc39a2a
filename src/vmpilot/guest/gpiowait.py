"""/bin/gpio-wait for the aarch64 guest: the power button of QEMU's virt board.

virt (booted from a device tree, no firmware) signals `system_powerdown` by
raising line 3 of its PL061 GPIO controller for 100 ms; the device tree's
gpio-keys node names that line. Debian's cloud arm64 kernel has the PL061
driver and the GPIO character device built in but no gpio-keys driver, so
this program stands in for it: `gpio-wait /dev/gpiochipN LINE` requests the
line's rising edges, writes "armed" (from then on no press is lost), then
"press" for each one, blocking in read() in between. busybox has no tool
that could do this ioctl. Machine code of the source below (assembled with
binutils' aarch64-linux-gnu-as, `objcopy -O binary -j .text`).
"""

from __future__ import annotations

# // gpio-wait CHIP LINE: request LINE of GPIO chip CHIP (/dev/gpiochipN) for
# // rising-edge events (GPIO character device, v1 ABI), write "armed\n", then
# // "edge\n" for each rising edge. Exit status 1 on any error.
#         .text
#         .global _start
# _start:
#         ldr     x0, [sp]                // argc
#         cmp     x0, #3
#         b.lt    fail
#         ldr     x1, [sp, #16]           // argv[1]: the chip
#         ldr     x2, [sp, #24]           // argv[2]: the line, decimal
#         mov     x9, #0
# digit:  ldrb    w3, [x2], #1
#         cbz     w3, open
#         sub     w3, w3, #'0'
#         cmp     w3, #9
#         b.hi    fail
#         mov     x4, #10
#         madd    x9, x9, x4, x3
#         b       digit
# open:   mov     x0, #-100               // openat(AT_FDCWD, chip, O_RDONLY)
#         mov     x2, #0
#         mov     x8, #56
#         svc     #0
#         tbnz    x0, #63, fail
#         sub     sp, sp, #64             // struct gpioevent_request (48 bytes), zeroed
#         stp     xzr, xzr, [sp]
#         stp     xzr, xzr, [sp, #16]
#         stp     xzr, xzr, [sp, #32]
#         str     w9, [sp]                // lineoffset
#         mov     w3, #1
#         str     w3, [sp, #4]            // handleflags = GPIOHANDLE_REQUEST_INPUT
#         str     w3, [sp, #8]            // eventflags = GPIOEVENT_REQUEST_RISING_EDGE
#         adr     x3, label               // consumer_label, the name /proc/interrupts shows
#         ldp     w4, w5, [x3]
#         stp     w4, w5, [sp, #12]
#         ldr     w4, [x3, #8]
#         str     w4, [sp, #20]
#         movz    x1, #0xb404             // GPIO_GET_LINEEVENT_IOCTL
#         movk    x1, #0xc030, lsl #16
#         mov     x2, sp
#         mov     x8, #29                 // ioctl(chip, ..., &request)
#         svc     #0
#         cbnz    x0, fail
#         ldr     w10, [sp, #44]          // request.fd: the line's event fd
#         adr     x1, armed
#         bl      say
# event:  mov     x0, x10                 // read(fd, sp, 16): one struct gpioevent_data
#         mov     x1, sp
#         mov     x2, #16
#         mov     x8, #63
#         svc     #0
#         cmp     x0, #16
#         b.ne    fail
#         adr     x1, press
#         bl      say
#         b       event
# say:    mov     x0, #1                  // write(1, x1, 6)
#         mov     x2, #6
#         mov     x8, #64
#         svc     #0
#         cmp     x0, #6
#         b.ne    fail
#         ret
# fail:   mov     x0, #1
#         mov     x8, #93                 // exit(1)
#         svc     #0
#         .balign 4
# label:  .ascii  "power-key\0\0\0"
# armed:  .ascii  "armed\n"
# press:  .ascii  "press\n"

CODE = bytes.fromhex(
    "e00340f91f0c00f10b070054e10b40f9e20f40f9090080d243144038e300003463c000517f24"
    "007108060054440180d2290d049bf9ffff17600c8092020080d2080780d2010000d40005f8b7"
    "ff0301d1ff7f00a9ff7f01a9ff7f02a9e90300b923008052e30700b9e30b00b9430400106414"
    "4029e4970129640840b9e41700b9818096d20106b8f2e2030091a80380d2010000d4a00200b5"
    "ea2f40b9210300100b000094e0030aaae1030091020280d2e80780d2010000d41f4000f16101"
    "00542102005002000094f7ffff17200080d2c20080d2080880d2010000d41f1800f141000054"
    "c0035fd6200080d2a80b80d2010000d4706f7765722d6b657900000061726d65640a70726573"
    "730a"
)
