//! Every number in `crypt-vfio-spec` against sources written by other people.
//!
//! The driver and the emulated device both take their offsets and bit numbers from
//! `crypt-vfio-spec`; a wrong number there is wrong on both sides and passes every other test.
//! Here each one is compared with:
//!
//! * `virtio-bindings` (rust-vmm's bindgen output of Linux's uapi headers): `virtio_ring`,
//!   `virtio_config` and `virtio_ids`. That crate (0.2.7) has no `virtio_pci` and no
//!   `virtio_crypto` module, so
//! * the PCI, virtio-PCI and virtio-crypto numbers and structure layouts are compared with the
//!   C headers themselves (`linux/pci_regs.h`, `linux/virtio_pci.h`, `linux/virtio_crypto.h`
//!   from the system's linux-libc-dev), compiled with the C compiler and read back with
//!   `offsetof`/`sizeof`. Without a C compiler or those headers that half skips, saying so.
//!
//! Not covered by either source (checked against the virtio 1.2 text only): the PCI vendor ID
//! 0x1af4 and the transitional device ID (uapi has no PCI ID list), the ISR queue bit (uapi names
//! only the configuration bit), and the largest split queue size 32768.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use crypt_vfio_spec::crypto::{
    self, aead, cipher, op, service, session_op, status, sym_op, CtrlPayload, CtrlRequest, DataParams,
    DataRequest, SessionInput,
};
use crypt_vfio_spec::pci::{self, cap, cap_type, cfg, common, feature};
use crypt_vfio_spec::ring;
use virtio_bindings::bindings::virtio_config as vc;
use virtio_bindings::bindings::virtio_ring as vr;
use virtio_bindings::virtio_ids as vid;

#[test]
fn ring_layout_and_flags_match_virtio_bindings() {
    assert_eq!(u32::from(ring::DESC_F_NEXT), vr::VRING_DESC_F_NEXT);
    assert_eq!(u32::from(ring::DESC_F_WRITE), vr::VRING_DESC_F_WRITE);
    assert_eq!(u32::from(ring::DESC_F_INDIRECT), vr::VRING_DESC_F_INDIRECT);
    assert_eq!(u32::from(ring::AVAIL_F_NO_INTERRUPT), vr::VRING_AVAIL_F_NO_INTERRUPT);
    assert_eq!(u32::from(ring::USED_F_NO_NOTIFY), vr::VRING_USED_F_NO_NOTIFY);

    assert_eq!(ring::DESC_SIZE as usize, size_of::<vr::vring_desc>());
    assert_eq!(ring::DESC_ADDR as usize, offset_of!(vr::vring_desc, addr));
    assert_eq!(ring::DESC_LEN as usize, offset_of!(vr::vring_desc, len));
    assert_eq!(ring::DESC_FLAGS as usize, offset_of!(vr::vring_desc, flags));
    assert_eq!(ring::DESC_NEXT as usize, offset_of!(vr::vring_desc, next));
    assert_eq!(ring::AVAIL_FLAGS as usize, offset_of!(vr::vring_avail, flags));
    assert_eq!(ring::AVAIL_IDX as usize, offset_of!(vr::vring_avail, idx));
    assert_eq!(ring::AVAIL_RING as usize, offset_of!(vr::vring_avail, ring));
    assert_eq!(ring::USED_FLAGS as usize, offset_of!(vr::vring_used, flags));
    assert_eq!(ring::USED_IDX as usize, offset_of!(vr::vring_used, idx));
    assert_eq!(ring::USED_RING as usize, offset_of!(vr::vring_used, ring));
    assert_eq!(ring::USED_ELEM_SIZE as usize, size_of::<vr::vring_used_elem>());
    assert_eq!(0, offset_of!(vr::vring_used_elem, id));
    assert_eq!(4, offset_of!(vr::vring_used_elem, len));

    // The ring sizes, event fields included (a u16 after each ring, virtio 1.2 section 2.7).
    let (avail_elem, used_elem) = (size_of::<u16>() as u64, size_of::<vr::vring_used_elem>() as u64);
    let (avail_hdr, used_hdr) = (size_of::<vr::vring_avail>() as u64, size_of::<vr::vring_used>() as u64);
    for size in [1u16, 8, 256, 32768] {
        let n = u64::from(size);
        assert_eq!(ring::desc_table_size(size), n * size_of::<vr::vring_desc>() as u64);
        assert_eq!(ring::used_event_offset(size), avail_hdr + n * avail_elem);
        assert_eq!(ring::avail_ring_size(size), avail_hdr + n * avail_elem + 2);
        assert_eq!(ring::avail_event_offset(size), used_hdr + n * used_elem);
        assert_eq!(ring::used_ring_size(size), used_hdr + n * used_elem + 2);
    }
}

#[test]
fn need_event_agrees_with_virtio_queue_near_the_wrap() {
    // virtio-queue's device side decides interrupts with EVENT_IDX in needs_notification: run
    // it on a real ring for every window around zero, the middle and the 16-bit wrap, and ask
    // ring::need_event the same question.
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let size = 16u16;
    let mut q = Queue::new(size).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_event_idx(true);
    q.set_ready(true);
    assert!(q.is_valid(&mem));
    let used_event = GuestAddress(0x1000 + ring::used_event_offset(size));
    let mut checked = 0;
    for base in [0u16, 0x7ff0, 0xfff0] {
        for old_off in 0..24u16 {
            for added in 0..size {
                for event_off in 0..48u16 {
                    let old = base.wrapping_add(old_off);
                    let new = old.wrapping_add(added);
                    let event = base.wrapping_add(event_off);
                    q.set_next_used(old);
                    q.needs_notification(&mem).unwrap(); // forgets earlier additions
                    for _ in 0..added {
                        q.add_used(&mem, 0, 0).unwrap();
                    }
                    mem.write_obj(event.to_le(), used_event).unwrap();
                    let theirs = q.needs_notification(&mem).unwrap();
                    assert_eq!(
                        ring::need_event(event, new, old),
                        theirs,
                        "event {event} new {new} old {old}"
                    );
                    checked += 1;
                }
            }
        }
    }
    println!("{checked} EVENT_IDX decisions agree with virtio-queue");
}

#[test]
fn feature_and_status_bits_match_virtio_bindings() {
    assert_eq!(feature::RING_INDIRECT_DESC, vr::VIRTIO_RING_F_INDIRECT_DESC);
    assert_eq!(feature::RING_EVENT_IDX, vr::VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(feature::VERSION_1, vc::VIRTIO_F_VERSION_1);
    assert_eq!(feature::ACCESS_PLATFORM, vc::VIRTIO_F_ACCESS_PLATFORM);
    assert_eq!(feature::RING_PACKED, vc::VIRTIO_F_RING_PACKED);
    assert_eq!(feature::RING_RESET, vc::VIRTIO_F_RING_RESET);

    assert_eq!(u32::from(pci::status::ACKNOWLEDGE), vc::VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(u32::from(pci::status::DRIVER), vc::VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(u32::from(pci::status::DRIVER_OK), vc::VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(u32::from(pci::status::FEATURES_OK), vc::VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(u32::from(pci::status::DEVICE_NEEDS_RESET), vc::VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(u32::from(pci::status::FAILED), vc::VIRTIO_CONFIG_S_FAILED);

    // Modern PCI device IDs are 0x1040 + the virtio device ID (virtio 1.2 section 4.1.2.1).
    assert_eq!(u32::from(pci::VIRTIO_CRYPTO_DEVICE_ID), 0x1040 + vid::VIRTIO_ID_CRYPTO);
}

/// `(C expression, our value)`: each expression is evaluated by the C compiler with Linux's
/// uapi headers.
fn c_checks() -> Vec<(&'static str, u64)> {
    let u = |v: u16| u64::from(v);
    vec![
        // PCI configuration header and capabilities (linux/pci_regs.h).
        ("PCI_VENDOR_ID", u(cfg::VENDOR_ID)),
        ("PCI_DEVICE_ID", u(cfg::DEVICE_ID)),
        ("PCI_COMMAND", u(cfg::COMMAND)),
        ("PCI_STATUS", u(cfg::STATUS)),
        ("PCI_REVISION_ID", u(cfg::REVISION)),
        ("PCI_CLASS_PROG", u(cfg::CLASS)),
        ("PCI_HEADER_TYPE", u(cfg::HEADER_TYPE)),
        ("PCI_BASE_ADDRESS_0", u(cfg::BAR0)),
        ("PCI_SUBSYSTEM_VENDOR_ID", u(cfg::SUBSYSTEM_VENDOR_ID)),
        ("PCI_SUBSYSTEM_ID", u(cfg::SUBSYSTEM_ID)),
        ("PCI_CAPABILITY_LIST", u(cfg::CAPABILITIES)),
        ("PCI_INTERRUPT_LINE", u(cfg::INTERRUPT_LINE)),
        ("PCI_COMMAND_MEMORY", u(pci::COMMAND_MEMORY)),
        ("PCI_COMMAND_MASTER", u(pci::COMMAND_BUS_MASTER)),
        ("PCI_COMMAND_INTX_DISABLE", u(pci::COMMAND_INTX_DISABLE)),
        ("PCI_STATUS_CAP_LIST", u(pci::STATUS_CAP_LIST)),
        ("PCI_CAP_ID_MSIX", pci::CAP_ID_MSIX.into()),
        ("PCI_CAP_ID_VNDR", pci::CAP_ID_VENDOR.into()),
        ("PCI_MSIX_FLAGS", u(pci::MSIX_MSG_CTRL)),
        ("PCI_MSIX_TABLE", u(pci::MSIX_TABLE)),
        ("PCI_MSIX_PBA", u(pci::MSIX_PBA)),
        ("PCI_MSIX_FLAGS_ENABLE", u(pci::MSIX_ENABLE)),
        ("PCI_MSIX_FLAGS_MASKALL", u(pci::MSIX_FUNCTION_MASK)),
        ("PCI_MSIX_FLAGS_QSIZE", u(pci::MSIX_TABLE_SIZE_MASK)),
        ("PCI_CFG_SPACE_SIZE", pci::PCI_CONFIG_SIZE as u64),
        // The virtio PCI transport (linux/virtio_pci.h).
        ("VIRTIO_PCI_CAP_COMMON_CFG", cap_type::COMMON.into()),
        ("VIRTIO_PCI_CAP_NOTIFY_CFG", cap_type::NOTIFY.into()),
        ("VIRTIO_PCI_CAP_ISR_CFG", cap_type::ISR.into()),
        ("VIRTIO_PCI_CAP_DEVICE_CFG", cap_type::DEVICE.into()),
        ("VIRTIO_PCI_CAP_PCI_CFG", cap_type::PCI.into()),
        ("offsetof(struct virtio_pci_cap, cap_vndr)", u(cap::VNDR)),
        ("offsetof(struct virtio_pci_cap, cap_next)", u(cap::NEXT)),
        ("offsetof(struct virtio_pci_cap, cap_len)", u(cap::LEN)),
        ("offsetof(struct virtio_pci_cap, cfg_type)", u(cap::CFG_TYPE)),
        ("offsetof(struct virtio_pci_cap, bar)", u(cap::BAR)),
        ("offsetof(struct virtio_pci_cap, id)", u(cap::ID)),
        ("offsetof(struct virtio_pci_cap, offset)", u(cap::OFFSET)),
        ("offsetof(struct virtio_pci_cap, length)", u(cap::LENGTH)),
        ("sizeof(struct virtio_pci_cap)", cap::SIZE.into()),
        ("offsetof(struct virtio_pci_notify_cap, notify_off_multiplier)", u(cap::NOTIFY_OFF_MULTIPLIER)),
        ("sizeof(struct virtio_pci_notify_cap)", cap::NOTIFY_SIZE.into()),
        ("offsetof(struct virtio_pci_common_cfg, device_feature_select)", common::DEVICE_FEATURE_SELECT),
        ("offsetof(struct virtio_pci_common_cfg, device_feature)", common::DEVICE_FEATURE),
        ("offsetof(struct virtio_pci_common_cfg, guest_feature_select)", common::DRIVER_FEATURE_SELECT),
        ("offsetof(struct virtio_pci_common_cfg, guest_feature)", common::DRIVER_FEATURE),
        ("offsetof(struct virtio_pci_common_cfg, msix_config)", common::CONFIG_MSIX_VECTOR),
        ("offsetof(struct virtio_pci_common_cfg, num_queues)", common::NUM_QUEUES),
        ("offsetof(struct virtio_pci_common_cfg, device_status)", common::DEVICE_STATUS),
        ("offsetof(struct virtio_pci_common_cfg, config_generation)", common::CONFIG_GENERATION),
        ("offsetof(struct virtio_pci_common_cfg, queue_select)", common::QUEUE_SELECT),
        ("offsetof(struct virtio_pci_common_cfg, queue_size)", common::QUEUE_SIZE),
        ("offsetof(struct virtio_pci_common_cfg, queue_msix_vector)", common::QUEUE_MSIX_VECTOR),
        ("offsetof(struct virtio_pci_common_cfg, queue_enable)", common::QUEUE_ENABLE),
        ("offsetof(struct virtio_pci_common_cfg, queue_notify_off)", common::QUEUE_NOTIFY_OFF),
        ("offsetof(struct virtio_pci_common_cfg, queue_desc_lo)", common::QUEUE_DESC),
        ("offsetof(struct virtio_pci_common_cfg, queue_avail_lo)", common::QUEUE_DRIVER),
        ("offsetof(struct virtio_pci_common_cfg, queue_used_lo)", common::QUEUE_DEVICE),
        ("offsetof(struct virtio_pci_common_cfg, queue_used_hi) + 4", common::SIZE),
        ("VIRTIO_PCI_COMMON_Q_USEDHI + 4", common::SIZE),
        ("VIRTIO_MSI_NO_VECTOR", u(pci::VIRTIO_MSI_NO_VECTOR)),
        ("VIRTIO_PCI_ISR_CONFIG", pci::ISR_CONFIG.into()),
        // virtio-crypto (linux/virtio_crypto.h).
        ("VIRTIO_CRYPTO_SERVICE_CIPHER", service::CIPHER.into()),
        ("VIRTIO_CRYPTO_SERVICE_HASH", service::HASH.into()),
        ("VIRTIO_CRYPTO_SERVICE_MAC", service::MAC.into()),
        ("VIRTIO_CRYPTO_SERVICE_AEAD", service::AEAD.into()),
        ("VIRTIO_CRYPTO_SERVICE_AKCIPHER", service::AKCIPHER.into()),
        ("VIRTIO_CRYPTO_NO_CIPHER", cipher::NO_CIPHER.into()),
        ("VIRTIO_CRYPTO_CIPHER_AES_ECB", cipher::AES_ECB.into()),
        ("VIRTIO_CRYPTO_CIPHER_AES_CBC", cipher::AES_CBC.into()),
        ("VIRTIO_CRYPTO_CIPHER_AES_CTR", cipher::AES_CTR.into()),
        ("VIRTIO_CRYPTO_CIPHER_3DES_CBC", cipher::DES3_CBC.into()),
        ("VIRTIO_CRYPTO_CIPHER_AES_XTS", cipher::AES_XTS.into()),
        ("VIRTIO_CRYPTO_NO_AEAD", aead::NO_AEAD.into()),
        ("VIRTIO_CRYPTO_AEAD_GCM", aead::GCM.into()),
        ("VIRTIO_CRYPTO_AEAD_CCM", aead::CCM.into()),
        ("VIRTIO_CRYPTO_AEAD_CHACHA20_POLY1305", aead::CHACHA20_POLY1305.into()),
        ("VIRTIO_CRYPTO_OPCODE(5, 7)", crypto::opcode(5, 7).into()),
        ("VIRTIO_CRYPTO_CIPHER_CREATE_SESSION", op::CIPHER_CREATE_SESSION.into()),
        ("VIRTIO_CRYPTO_CIPHER_DESTROY_SESSION", op::CIPHER_DESTROY_SESSION.into()),
        ("VIRTIO_CRYPTO_AEAD_CREATE_SESSION", op::AEAD_CREATE_SESSION.into()),
        ("VIRTIO_CRYPTO_AEAD_DESTROY_SESSION", op::AEAD_DESTROY_SESSION.into()),
        ("VIRTIO_CRYPTO_CIPHER_ENCRYPT", op::CIPHER_ENCRYPT.into()),
        ("VIRTIO_CRYPTO_CIPHER_DECRYPT", op::CIPHER_DECRYPT.into()),
        ("VIRTIO_CRYPTO_AEAD_ENCRYPT", op::AEAD_ENCRYPT.into()),
        ("VIRTIO_CRYPTO_AEAD_DECRYPT", op::AEAD_DECRYPT.into()),
        ("VIRTIO_CRYPTO_OP_ENCRYPT", session_op::ENCRYPT.into()),
        ("VIRTIO_CRYPTO_OP_DECRYPT", session_op::DECRYPT.into()),
        ("VIRTIO_CRYPTO_SYM_OP_NONE", sym_op::NONE.into()),
        ("VIRTIO_CRYPTO_SYM_OP_CIPHER", sym_op::CIPHER.into()),
        ("VIRTIO_CRYPTO_SYM_OP_ALGORITHM_CHAINING", sym_op::ALGORITHM_CHAINING.into()),
        ("VIRTIO_CRYPTO_OK", status::OK.into()),
        ("VIRTIO_CRYPTO_ERR", status::ERR.into()),
        ("VIRTIO_CRYPTO_BADMSG", status::BADMSG.into()),
        ("VIRTIO_CRYPTO_NOTSUPP", status::NOTSUPP.into()),
        ("VIRTIO_CRYPTO_INVSESS", status::INVSESS.into()),
        ("VIRTIO_CRYPTO_NOSPC", status::NOSPC.into()),
        ("VIRTIO_CRYPTO_KEY_REJECTED", status::KEY_REJECTED.into()),
        ("VIRTIO_CRYPTO_S_HW_READY", crypto::VIRTIO_CRYPTO_S_HW_READY.into()),
        ("sizeof(struct virtio_crypto_op_ctrl_req)", crypto::CTRL_REQ_SIZE as u64),
        ("sizeof(struct virtio_crypto_op_data_req)", crypto::DATA_REQ_SIZE as u64),
        ("sizeof(struct virtio_crypto_session_input)", crypto::SESSION_INPUT_SIZE as u64),
        ("sizeof(struct virtio_crypto_inhdr)", crypto::INHDR_SIZE as u64),
        ("offsetof(struct virtio_crypto_config, status)", crypto::config::STATUS),
        ("offsetof(struct virtio_crypto_config, max_dataqueues)", crypto::config::MAX_DATAQUEUES),
        ("offsetof(struct virtio_crypto_config, crypto_services)", crypto::config::CRYPTO_SERVICES),
        ("offsetof(struct virtio_crypto_config, cipher_algo_l)", crypto::config::CIPHER_ALGO_L),
        ("offsetof(struct virtio_crypto_config, cipher_algo_h)", crypto::config::CIPHER_ALGO_H),
        ("offsetof(struct virtio_crypto_config, hash_algo)", crypto::config::HASH_ALGO),
        ("offsetof(struct virtio_crypto_config, mac_algo_l)", crypto::config::MAC_ALGO_L),
        ("offsetof(struct virtio_crypto_config, mac_algo_h)", crypto::config::MAC_ALGO_H),
        ("offsetof(struct virtio_crypto_config, aead_algo)", crypto::config::AEAD_ALGO),
        ("offsetof(struct virtio_crypto_config, max_cipher_key_len)", crypto::config::MAX_CIPHER_KEY_LEN),
        ("offsetof(struct virtio_crypto_config, max_auth_key_len)", crypto::config::MAX_AUTH_KEY_LEN),
        ("offsetof(struct virtio_crypto_config, akcipher_algo)", crypto::config::AKCIPHER_ALGO),
        ("offsetof(struct virtio_crypto_config, max_size)", crypto::config::MAX_SIZE),
        ("sizeof(struct virtio_crypto_config)", crypto::config::SIZE),
    ]
}

/// Field offsets inside the request structures, looked up by the C compiler and then compared
/// with where `encode`/`decode` put each field.
const C_FIELDS: &[&str] = &[
    "offsetof(struct virtio_crypto_op_ctrl_req, header.opcode)",
    "offsetof(struct virtio_crypto_op_ctrl_req, header.algo)",
    "offsetof(struct virtio_crypto_op_ctrl_req, header.flag)",
    "offsetof(struct virtio_crypto_op_ctrl_req, header.queue_id)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.sym_create_session.u.cipher.para.algo)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.sym_create_session.u.cipher.para.keylen)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.sym_create_session.u.cipher.para.op)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.sym_create_session.op_type)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.aead_create_session.para.algo)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.aead_create_session.para.key_len)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.aead_create_session.para.hash_result_len)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.aead_create_session.para.aad_len)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.aead_create_session.para.op)",
    "offsetof(struct virtio_crypto_op_ctrl_req, u.destroy_session.session_id)",
    "offsetof(struct virtio_crypto_session_input, session_id)",
    "offsetof(struct virtio_crypto_session_input, status)",
    "offsetof(struct virtio_crypto_op_data_req, header.opcode)",
    "offsetof(struct virtio_crypto_op_data_req, header.algo)",
    "offsetof(struct virtio_crypto_op_data_req, header.session_id)",
    "offsetof(struct virtio_crypto_op_data_req, header.flag)",
    "offsetof(struct virtio_crypto_op_data_req, u.sym_req.u.cipher.para.iv_len)",
    "offsetof(struct virtio_crypto_op_data_req, u.sym_req.u.cipher.para.src_data_len)",
    "offsetof(struct virtio_crypto_op_data_req, u.sym_req.u.cipher.para.dst_data_len)",
    "offsetof(struct virtio_crypto_op_data_req, u.sym_req.op_type)",
    "offsetof(struct virtio_crypto_op_data_req, u.aead_req.para.iv_len)",
    "offsetof(struct virtio_crypto_op_data_req, u.aead_req.para.aad_len)",
    "offsetof(struct virtio_crypto_op_data_req, u.aead_req.para.src_data_len)",
    "offsetof(struct virtio_crypto_op_data_req, u.aead_req.para.dst_data_len)",
];

/// Evaluates `exprs` with the C compiler against Linux's uapi headers; `None` (with the reason
/// printed) when there is no compiler or no headers.
fn eval_c(exprs: &[&str]) -> Option<HashMap<String, u64>> {
    let headers = ["linux/pci_regs.h", "linux/virtio_pci.h", "linux/virtio_crypto.h"];
    if let Some(h) = headers.iter().find(|h| !std::path::Path::new("/usr/include").join(h).exists()) {
        println!("SKIP: /usr/include/{h} is missing (apt-get install linux-libc-dev)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut src = String::from("#include <stdio.h>\n#include <stddef.h>\n");
    for h in headers {
        src += &format!("#include <{h}>\n");
    }
    src += "int main(void) {\n";
    for (i, e) in exprs.iter().enumerate() {
        src += &format!("  printf(\"{i} %llu\\n\", (unsigned long long)({e}));\n");
    }
    src += "  return 0;\n}\n";
    let c = dir.path().join("consts.c");
    let exe = dir.path().join("consts");
    std::fs::write(&c, src).unwrap();
    let out = match Command::new("cc").arg("-o").arg(&exe).arg(&c).output() {
        Ok(o) => o,
        Err(e) => {
            println!("SKIP: no C compiler (cc: {e})");
            return None;
        }
    };
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let values: HashMap<usize, u64> = text
        .lines()
        .map(|l| {
            let (i, v) = l.split_once(' ').unwrap();
            (i.parse().unwrap(), v.parse().unwrap())
        })
        .collect();
    Some(exprs.iter().enumerate().map(|(i, e)| (e.to_string(), values[&i])).collect())
}

#[test]
fn pci_and_crypto_numbers_match_the_linux_headers() {
    let checks = c_checks();
    let exprs: Vec<&str> = checks.iter().map(|(e, _)| *e).collect();
    let Some(c) = eval_c(&exprs) else { return };
    let wrong: Vec<String> = checks
        .iter()
        .filter(|(e, ours)| c[*e] != *ours)
        .map(|(e, ours)| format!("{e} = {:#x} in C, {ours:#x} in crypt-vfio-spec", c[*e]))
        .collect();
    assert!(wrong.is_empty(), "crypt-vfio-spec disagrees with Linux:\n{}", wrong.join("\n"));
    println!("{} numbers checked against the Linux headers", checks.len());
}

fn put_u32(b: &mut [u8], off: u64, v: u32) {
    b[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: u64, v: u64) {
    b[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Requests built field by field at the C offsets must be what `encode` writes and what
/// `decode` reads, for every request kind the driver and the device exchange.
#[test]
fn request_layouts_match_the_linux_structures() {
    let Some(c) = eval_c(C_FIELDS) else { return };
    let at = |field: &str| c[&format!("offsetof(struct virtio_crypto_{field})")];
    let ctrl = |f: &str| at(&format!("op_ctrl_req, {f}"));
    let data = |f: &str| at(&format!("op_data_req, {f}"));

    // Control: create a cipher session.
    let mut want = [0u8; crypto::CTRL_REQ_SIZE];
    put_u32(&mut want, ctrl("header.opcode"), op::CIPHER_CREATE_SESSION);
    put_u32(&mut want, ctrl("header.algo"), 0x1111_1111);
    put_u32(&mut want, ctrl("header.flag"), 0x2222_2222);
    put_u32(&mut want, ctrl("header.queue_id"), 0x3333_3333);
    put_u32(&mut want, ctrl("u.sym_create_session.u.cipher.para.algo"), cipher::AES_XTS);
    put_u32(&mut want, ctrl("u.sym_create_session.u.cipher.para.keylen"), 64);
    put_u32(&mut want, ctrl("u.sym_create_session.u.cipher.para.op"), session_op::DECRYPT);
    put_u32(&mut want, ctrl("u.sym_create_session.op_type"), sym_op::CIPHER);
    let r = CtrlRequest {
        opcode: op::CIPHER_CREATE_SESSION,
        algo: 0x1111_1111,
        flag: 0x2222_2222,
        queue_id: 0x3333_3333,
        payload: CtrlPayload::CreateCipher { algo: cipher::AES_XTS, key_len: 64, op: session_op::DECRYPT },
    };
    assert_eq!(r.encode(), want, "cipher create-session request");
    assert_eq!(CtrlRequest::decode(&want), Some(r));

    // Control: create an AEAD session.
    let mut want = [0u8; crypto::CTRL_REQ_SIZE];
    put_u32(&mut want, ctrl("header.opcode"), op::AEAD_CREATE_SESSION);
    put_u32(&mut want, ctrl("header.algo"), aead::GCM);
    put_u32(&mut want, ctrl("u.aead_create_session.para.algo"), aead::GCM);
    put_u32(&mut want, ctrl("u.aead_create_session.para.key_len"), 32);
    put_u32(&mut want, ctrl("u.aead_create_session.para.hash_result_len"), 16);
    put_u32(&mut want, ctrl("u.aead_create_session.para.aad_len"), 300);
    put_u32(&mut want, ctrl("u.aead_create_session.para.op"), session_op::ENCRYPT);
    let r = CtrlRequest {
        opcode: op::AEAD_CREATE_SESSION,
        algo: aead::GCM,
        flag: 0,
        queue_id: 0,
        payload: CtrlPayload::CreateAead {
            algo: aead::GCM,
            key_len: 32,
            tag_len: 16,
            aad_len: 300,
            op: session_op::ENCRYPT,
        },
    };
    assert_eq!(r.encode(), want, "AEAD create-session request");
    assert_eq!(CtrlRequest::decode(&want), Some(r));

    // Control: destroy a session.
    let mut want = [0u8; crypto::CTRL_REQ_SIZE];
    put_u32(&mut want, ctrl("header.opcode"), op::AEAD_DESTROY_SESSION);
    put_u64(&mut want, ctrl("u.destroy_session.session_id"), 0x0123_4567_89ab_cdef);
    let r = CtrlRequest {
        opcode: op::AEAD_DESTROY_SESSION,
        algo: 0,
        flag: 0,
        queue_id: 0,
        payload: CtrlPayload::Destroy { session_id: 0x0123_4567_89ab_cdef },
    };
    assert_eq!(r.encode(), want, "destroy-session request");
    assert_eq!(CtrlRequest::decode(&want), Some(r));

    // The device's answer to a create-session request.
    let mut want = [0u8; crypto::SESSION_INPUT_SIZE];
    put_u64(&mut want, at("session_input, session_id"), 0xfeed_beef_0000_0042);
    put_u32(&mut want, at("session_input, status"), u32::from(status::NOSPC));
    let s = SessionInput { session_id: 0xfeed_beef_0000_0042, status: u32::from(status::NOSPC) };
    assert_eq!(s.encode(), want, "session input");
    assert_eq!(SessionInput::decode(&want), s);

    // Data: a cipher request.
    let mut want = [0u8; crypto::DATA_REQ_SIZE];
    put_u32(&mut want, data("header.opcode"), op::CIPHER_DECRYPT);
    put_u32(&mut want, data("header.algo"), cipher::AES_CBC);
    put_u64(&mut want, data("header.session_id"), 0x0102_0304_0506_0708);
    put_u32(&mut want, data("header.flag"), 0x55);
    put_u32(&mut want, data("u.sym_req.u.cipher.para.iv_len"), 16);
    put_u32(&mut want, data("u.sym_req.u.cipher.para.src_data_len"), 4096);
    put_u32(&mut want, data("u.sym_req.u.cipher.para.dst_data_len"), 4095);
    put_u32(&mut want, data("u.sym_req.op_type"), sym_op::CIPHER);
    let r = DataRequest {
        opcode: op::CIPHER_DECRYPT,
        algo: cipher::AES_CBC,
        session_id: 0x0102_0304_0506_0708,
        flag: 0x55,
        params: DataParams::Cipher { iv_len: 16, src_len: 4096, dst_len: 4095 },
    };
    assert_eq!(r.encode(), want, "cipher data request");
    assert_eq!(DataRequest::decode(&want), Some(r));

    // Data: an AEAD request.
    let mut want = [0u8; crypto::DATA_REQ_SIZE];
    put_u32(&mut want, data("header.opcode"), op::AEAD_ENCRYPT);
    put_u32(&mut want, data("header.algo"), aead::GCM);
    put_u64(&mut want, data("header.session_id"), 9);
    put_u32(&mut want, data("u.aead_req.para.iv_len"), 12);
    put_u32(&mut want, data("u.aead_req.para.aad_len"), 20);
    put_u32(&mut want, data("u.aead_req.para.src_data_len"), 100);
    put_u32(&mut want, data("u.aead_req.para.dst_data_len"), 116);
    // Padding in Linux's struct, `tag_len` in the virtio specification's (checked below).
    put_u32(&mut want, 40, 16);
    let r = DataRequest {
        opcode: op::AEAD_ENCRYPT,
        algo: aead::GCM,
        session_id: 9,
        flag: 0,
        params: DataParams::Aead { iv_len: 12, aad_len: 20, src_len: 100, dst_len: 116, tag_len: 16 },
    };
    assert_eq!(r.encode(), want, "AEAD data request");
    assert_eq!(DataRequest::decode(&want), Some(r));
}

/// The virtio specification (1.2, section 5.9.7.6) puts `tag_len` in `virtio_crypto_aead_data_flf`
/// right after `dst_data_len`, at byte 40 of the request; Linux's uapi struct has padding there,
/// so the C check above cannot see it. A device written from the specification reads it.
#[test]
fn aead_requests_carry_the_tag_length_where_the_virtio_spec_puts_it() {
    for (opcode, src_len, dst_len) in [(op::AEAD_ENCRYPT, 100, 116), (op::AEAD_DECRYPT, 116, 100)] {
        let r = DataRequest {
            opcode,
            algo: aead::GCM,
            session_id: 1,
            flag: 0,
            params: DataParams::Aead { iv_len: 12, aad_len: 8, src_len, dst_len, tag_len: 16 },
        };
        let b = r.encode();
        assert_eq!(&b[40..44], &16u32.to_le_bytes(), "tag_len of {opcode:#x}");
        assert_eq!(DataRequest::decode(&b), Some(r));
    }
}
