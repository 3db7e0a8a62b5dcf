// Package luks reads and writes LUKS volume headers (LUKS1 and LUKS2) and
// encrypts sectors with the volume key they protect. It is shared by the
// luks format driver and qcow2's encrypt.format=luks, which keeps a LUKS
// header inside the qcow2 file (drivers may not import each other).
//
// On-disk facts relied on (cryptsetup's "LUKS1 On-Disk Format
// Specification" and "LUKS2 On-Disk Format", qemu's crypto/block-luks):
//
// LUKS1: a 592-byte big-endian header at offset 0: magic "LUKS\xba\xbe",
// version 1, cipher name (32 bytes, "aes"), cipher mode (32, "xts-plain64",
// "cbc-essiv:sha256"), hash spec (32), payload offset (sectors of 512
// bytes), key bytes, master-key digest (20 bytes) with its salt (32) and
// PBKDF2 iteration count, UUID (40 bytes of text), then 8 key slots of 48
// bytes: state (0x00AC71F3 active, 0x0000DEAD inactive), PBKDF2 iterations,
// salt (32), key material offset (sectors), stripes (4000).
//
// LUKS2: two copies of a 4096-byte binary header, each followed by its JSON
// area (hdr_size covers both, 16 KiB to 4 MiB, a power of two; the second
// copy starts at hdr_size). Binary header: magic ("LUKS\xba\xbe" first,
// "SKUL\xba\xbe" second), version 2, hdr_size, seqid, label (48), checksum
// algorithm (32, "sha256"), salt (64), UUID (40), subsystem (48), hdr_offset,
// padding, checksum (64) at 448. The checksum covers all hdr_size bytes
// with the checksum field zeroed. The JSON object holds keyslots, tokens,
// segments, digests and config; 64-bit numbers are JSON strings.
//
// Key slots: a key derived from the passphrase (PBKDF2, or Argon2i/Argon2id
// in LUKS2) decrypts the slot's key material, stripes*key-bytes bytes
// encrypted in 512-byte sectors numbered from 0 at the start of the slot
// area with the slot's cipher (LUKS1: the volume cipher). The anti-forensic
// merge (XOR then diffuse with the hash, block by block, over every stripe
// but the last, XORed with the last) gives a candidate volume key; the
// digest (PBKDF2 of the candidate with the digest salt: 20 bytes in LUKS1,
// the stored length in LUKS2) says whether it is the right one.
//
// Data: each sector of the payload is encrypted on its own; the IV
// generator gives the sector number (plain: low 32 bits little-endian,
// plain64: 64 bits little-endian, plain64be: big-endian at the IV's end,
// essiv: the sector number encrypted with a key that is the hash of the
// volume key). LUKS2 counts IVs in units of the segment's sector size
// (cryptsetup's default for LUKS2) plus iv_tweak; LUKS1 sectors are 512
// bytes.
package luks
