// Package luks is the luks format: a LUKS1 or LUKS2 volume in a file, as
// qemu's luks driver and cryptsetup keep it (driver name "luks"). The
// header, key slots and ciphers are internal/luks; this package is the
// image on top of them.
//
// Layout facts: the header starts at offset 0 (magic "LUKS\xba\xbe", a
// big-endian version 1 or 2); the payload starts at the header's payload
// offset (LUKS1, in 512-byte sectors; LUKS2, the crypt segment's offset)
// and runs to the end of the file, or for the segment's size when LUKS2
// fixes one. The virtual disk is the payload, whole encryption sectors
// (512 bytes; LUKS2 may use up to 4096): each is encrypted on its own with
// the volume key, its IV from its sector number (plus LUKS2's iv_tweak).
//
// A LUKS volume has no allocation map: every sector is data. qemu-img
// create leaves a new volume's payload unwritten, so there it decrypts to
// noise; vdisk's containers assume a new image reads zeros (convert skips
// zero runs), so Create (and a grow) encrypts zeros over the new payload.
//
// Keys: the passphrase comes from the Secrets provider under the id the
// key-secret option names (qemu's --object secret,id=ID plus
// key-secret=ID); it is wiped once a key slot opened, and the volume key
// once the cipher holds it expanded.
package luks
