// Package vboxcrypt is VirtualBox's disk encryption (the VD "CRYPT" filter)
// for VDI, VMDK and VHD images: the key store VirtualBox keeps in a medium's
// CRYPT/KeyStore property, and the sector cipher.
//
// The facts, from VirtualBox's source (src/VBox/Storage/VDKeyStore.cpp,
// VDFilterCrypt.cpp and VD.cpp, open source since 7.0 when the crypto
// module left the extension pack):
//
//   - The key store is a packed little-endian structure of 250 bytes
//     (VDKeyStore): magic 0x454e4353 ("SCNE" on disk), version 0x0100, the
//     cipher name (32 bytes, NUL padded: AES-XTS128-PLAIN64 or
//     AES-XTS256-PLAIN64), the key derivation name (32 bytes: PBKDF2-SHA1,
//     PBKDF2-SHA256 or PBKDF2-SHA512), the DEK size (32 or 64), the DEK
//     digest (32 bytes) and its length, the digest's salt (32 bytes) and
//     iteration count, the KEK's salt (32 bytes) and iteration count, the
//     encrypted DEK's length and the encrypted DEK (64 bytes). It travels
//     base64 encoded (IPRT wraps lines at 64 characters; whitespace is
//     ignored when decoding) in the medium property CRYPT/KeyStore of the
//     media registry (<HardDisk uuid=...><Property name="CRYPT/KeyStore"
//     value=.../> in the VM's .vbox file or VirtualBox.xml), next to
//     CRYPT/KeyId, the name of the password. Nothing is stored in the image.
//   - Unlocking (vdKeyStoreGetDekFromEncoded): KEK = PBKDF2-HMAC(digest of
//     the KDF name, password, KEK salt, KEK iterations, DEK size bytes); the
//     DEK = the store's cipher (AES-XTS with the KEK as its key) decrypting
//     the encrypted DEK with an all-zero tweak; the password is right when
//     PBKDF2-HMAC(digest, DEK, digest salt, digest iterations, digest
//     length) equals the stored digest.
//   - Creating (vdKeyStoreCreate): random salts, PBKDF2-SHA256, KEK
//     iterations from a 250 ms benchmark (at least 20000), digest iterations
//     20000, a random DEK of 32 (XTS-128) or 64 (XTS-256) bytes.
//   - Data (cryptFilterEncDecXts): the filter sits on the whole disk (every
//     image of the chain, one DEK), above the images; each data unit (the
//     image's sector, 512 bytes for VDI, VMDK and VHD) is AES-XTS encrypted
//     with the tweak = the virtual disk offset / 512 as a little-endian
//     64-bit number (plain64).
//
// Sources read: VDKeyStore.cpp (VDKeyStore, vdKeyStoreGetDekFromEncoded,
// vdKeyStoreCreate, vdKeyStoreDeriveKeyFromPassword,
// vdKeyStoreDekDecryptWithKey, vdKeyStoreCheckDekAgainstDigest),
// VDFilterCrypt.cpp (s_aCryptAlgoMapping, cryptFilterEncDecXts,
// cryptCreate: config keys Algorithm, KeyId, KeyStore, CreateKeyStore),
// VD.cpp (vdFilterChainApplyRead/Write on the request's virtual offset,
// vdIOIntIoCtxGetDataUnitSize: the last image's region block size).
// Stores VirtualBox made, published in write-ups, parse and re-marshal to
// the same bytes (store_test.go).
//
// One deviation, on purpose: VirtualBox runs its filter over every sector it
// reads, so sectors no image holds read as the decryption of zeros (noise).
// Here they read as zeros (or the parent), which keeps copies sparse; data
// the guest wrote reads the same. So that VirtualBox reads what vdisk
// wrote: convert writes every sector into an encrypted target; the filter
// offers no write-zeroes or discard (zeros are written encrypted); and a
// write starting or ending in a unit the image does not hold as data is
// widened to the whole unit, so no plain zeros a driver pads a new unit
// with are left behind.
package vboxcrypt
