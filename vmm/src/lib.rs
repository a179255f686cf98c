//! rayos-vmm: RayOS's KVM virtual machine monitor, one process per VM.
//!
//! [`Vmm::build`] turns a [`spec::VmSpec`] into a ready VM (memory, devices, ACPI, boot
//! state, vCPUs); [`Vmm::run`] starts the vCPU threads and the control socket, isolates the
//! process and returns why the VM ended.

pub mod acpi;
pub mod attach;
pub mod boot;
pub mod bus;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod display_channel;
pub mod isolation;
pub mod error;
pub mod events;
pub mod layout;
pub mod lifecycle;
pub mod memory;
pub mod ratelimit;
pub mod screenshot;
pub mod snapshot;
pub mod spec;
pub mod vcpu;
pub mod vm;
pub mod vmdir;

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::devices::legacy::acpi_pm::{AcpiPm, PowerButton};
use crate::devices::legacy::boot_timer::{BootTime, BootTimer};
use crate::devices::legacy::cmos::Cmos;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{self, SerialDevice, SerialRing, SerialSink};
use crate::devices::legacy::IrqTrigger;
pub use crate::error::{Error, Result};
pub use crate::lifecycle::{ExitReason, EXIT_CODE_REBOOT};
use crate::layout::pio;
use crate::lifecycle::Lifecycle;
use crate::memory::GuestRam;
use crate::spec::VmSpec;
use crate::snapshot::{Loaded, SnapshotError};
use crate::vcpu::{RunControl, SharedVcpu, VcpuContext};
use crate::vm::Vm;

/// What the control socket and the main loop share about a running VM.
pub struct VmShared {
    pub name: String,
    pub memory_mib: u64,
    pub start: Instant,
    pub lifecycle: Arc<Lifecycle>,
    pub control: Arc<RunControl>,
    pub exits: Arc<Vec<AtomicU64>>,
    pub boot_time: BootTime,
    pub serial_ring: SerialRing,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub power_button: PowerButton,
    pub devices: attach::Attached,
    pub snapshot: snapshot::Sources,
    /// The supervisor connection's events (nowhere until `--control-fd` is served).
    pub events: events::EventSink,
    /// `spec.vm_dir`, open: where snapshots and screenshots go.
    pub vm_dir: Option<Arc<vmdir::VmDir>>,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl VmShared {
    /// Parks every vCPU; false if one did not stop within `timeout`.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.control.set_paused(true);
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let t0 = Instant::now();
        while self.control.parked() < threads.len() {
            if t0.elapsed() > timeout {
                return false;
            }
            self.kick(&threads);
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Continues a paused VM: the devices a snapshot left paused, then the vCPUs, told that
    /// they were stopped (KVM_KVMCLOCK_CTRL).
    pub fn resume(&self) {
        if let Some(pci) = &self.devices.pci {
            pci.resume();
        }
        if self.control.is_paused() {
            vcpu::tell_guest_it_was_paused(&self.snapshot.vcpus);
        }
        self.control.set_paused(false);
    }

    fn kick(&self, threads: &[libc::pthread_t]) {
        for t in threads {
            // SAFETY: the vCPU threads are joined only after the VM stopped kicking them,
            // so each pthread_t is valid; the signal has a no-op handler.
            unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
        }
    }
}

pub struct Vmm {
    spec: VmSpec,
    vm: Arc<Vm>,
    ram: GuestRam,
    pio: Bus,
    mmio: Bus,
    vcpus: Vec<SharedVcpu>,
    shared: Arc<VmShared>,
}

/// Puts a snapshot's pixels back into the display's framebuffer (built from the same spec,
/// so the same size; checked all the same).
fn load_framebuffer(snap: &Loaded, fb: Option<&devices::display::SharedFramebuffer>) -> Result<()> {
    let (Some(file), Some(info), Some(fb)) = (&snap.framebuffer, &snap.state.framebuffer, fb) else {
        return Ok(());
    };
    let path = snap.dir.join(&info.file);
    if info.size != fb.size() {
        return Err(Error::StateRejected {
            file: snap.dir.join(snapshot::STATE_FILE),
            field: "framebuffer.size".into(),
            reason: format!("{} bytes, but this display's framebuffer has {}", info.size, fb.size()),
        });
    }
    load_part(&path, file, fb.file(), info)?;
    Ok(())
}

/// Copies a snapshot's memory part into `dst`, each chunk verified before it is written.
fn load_part(path: &std::path::Path, src: &File, dst: &File, info: &snapshot::MemoryInfo) -> Result<u64> {
    snapshot::memfile::load(src, dst, info.size, &info.chunks).map_err(|e| match e {
        snapshot::memfile::LoadError::Io(e) => Error::StateRejected { file: path.to_path_buf(), field: "(read)".into(), reason: e.to_string() },
        e => Error::StateRejected { file: path.to_path_buf(), field: "chunks".into(), reason: e.to_string() },
    })
}

/// What a cold boot and a restore build alike from the spec, before any vCPU exists: the
/// KVM VM with its RAM mapped (and still empty), the buses with the legacy devices and the
/// PCI devices the spec asks for.
struct Machine {
    vm: Arc<Vm>,
    ram: GuestRam,
    vm_dir: Option<Arc<vmdir::VmDir>>,
    pio: Bus,
    mmio: Bus,
    lifecycle: Arc<Lifecycle>,
    serial_ring: SerialRing,
    serial: Arc<Mutex<SerialDevice>>,
    boot_time: BootTime,
    events: events::EventSink,
    power_button: PowerButton,
    cmos: Arc<Mutex<Cmos>>,
    devices: attach::Attached,
}

impl Machine {
    /// `saved`: on a restore, the legacy devices' saved state (their registers, the boot
    /// time), and the console continues its log instead of starting a new one.
    fn assemble(spec: &VmSpec, start: Instant, saved: Option<&snapshot::LegacyState>) -> Result<Machine> {
        spec.validate()?;
        let vm_dir = match &spec.vm_dir {
            Some(d) => Some(Arc::new(vmdir::VmDir::open(d).map_err(|e| Error::Device { device: "vm_dir".into(), reason: e.to_string() })?)),
            None => None,
        };
        let vm = Arc::new(Vm::new()?);
        let ram = GuestRam::new(&spec.name, spec.memory_bytes())?;
        vm.map_ram(&ram.memory)?;
        let lifecycle = Arc::new(Lifecycle::default());
        let mut pio_bus = Bus::new("pio");
        let mut mmio_bus = Bus::new("mmio");

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::io("serial eventfd", e))?;
        vm.register_irqfd(&serial_irq, layout::COM1_GSI)?;
        let log = match &spec.serial_log {
            // A restored VM's console continues the log of the run it was saved from.
            Some(p) => {
                let file = File::options()
                    .write(true)
                    .create(true)
                    .append(saved.is_some())
                    .truncate(saved.is_none())
                    .open(p)
                    .map_err(|e| Error::io(format!("serial log {}", p.display()), e))?;
                // It rotates only inside the VM's directory, where the VMM may rename.
                let rotate = vm_dir.as_ref().and_then(|d| Some((d.clone(), d.name_of(p).ok()?)));
                if rotate.is_none() {
                    tracing::info!("serial log {} is not directly in spec.vm_dir: it stops at {} bytes instead of rotating", p.display(), serial::LOG_LIMIT);
                }
                Some(serial::SerialLog::new(file, serial::LOG_LIMIT, rotate))
            }
            None => None,
        };
        let serial_ring = SerialRing::default();
        let events = events::EventSink::default();
        let boot_time = BootTime::with_events(events.clone());
        if let Some(ms) = saved.and_then(|s| s.boot_ms) {
            boot_time.set(ms);
        }
        let sink = SerialSink {
            log,
            ring: serial_ring.clone(),
            stdout: spec.serial_stdout,
            boot_marker: Some((start, boot_time.clone())),
            marker_matched: 0,
        };
        let serial = match saved {
            Some(s) => SerialDevice::from_state(&s.serial, IrqTrigger(serial_irq), sink)
                .map_err(|reason| Error::Device { device: "com1".into(), reason })?,
            None => SerialDevice::new(IrqTrigger(serial_irq), sink),
        };
        let serial = Arc::new(Mutex::new(serial));
        pio_bus.insert(pio::COM1 as u64, 8, "com1", serial.clone())?;
        pio_bus.insert(pio::I8042 as u64, 5, "i8042", Arc::new(Mutex::new(I8042::new(lifecycle.clone()))))?;
        let mut cmos = Cmos::default();
        if let Some(s) = saved {
            cmos.restore_state(&s.cmos).map_err(|reason| Error::Device { device: "cmos".into(), reason })?;
        }
        let cmos = Arc::new(Mutex::new(cmos));
        pio_bus.insert(pio::CMOS as u64, 2, "cmos", cmos.clone())?;
        pio_bus.insert(
            pio::BOOT_TIMER as u64,
            4,
            "boot-timer",
            Arc::new(Mutex::new(BootTimer::new(start, boot_time.clone()))),
        )?;
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::io("GED eventfd", e))?;
        vm.register_irqfd(&ged_irq, layout::GED_GSI)?;
        let power_button = PowerButton::new(ged_irq);
        pio_bus.insert(
            AcpiPm::BASE as u64,
            AcpiPm::LEN,
            "acpi-pm",
            Arc::new(Mutex::new(AcpiPm::new(lifecycle.clone(), power_button.clone()))),
        )?;

        let devices = attach::attach(spec, vm.clone(), &ram.memory, &mut pio_bus, &mut mmio_bus, &events)?;
        Ok(Machine {
            vm,
            ram,
            vm_dir,
            pio: pio_bus,
            mmio: mmio_bus,
            lifecycle,
            serial_ring,
            serial,
            boot_time,
            events,
            power_button,
            cmos,
            devices,
        })
    }

    /// The vCPUs, vCPU 0 starting at `entry` on a cold boot, and the MSRs a snapshot saves.
    fn create_vcpus(&self, spec: &VmSpec, entry: Option<u64>) -> Result<(Vec<SharedVcpu>, Vec<u32>)> {
        let mut vcpus = Vec::new();
        for id in 0..spec.vcpus {
            let fd = vcpu::create(&self.vm, &self.ram.memory, id, spec.vcpus, entry.filter(|_| id == 0))?;
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let msrs = vcpu::saveable_msrs(&self.vm, &vcpus[0].lock().unwrap_or_else(|p| p.into_inner()))?;
        Ok((vcpus, msrs))
    }

    fn into_vmm(self, spec: VmSpec, start: Instant, vcpus: Vec<SharedVcpu>, msrs: Vec<u32>) -> Vmm {
        let Machine { vm, ram, vm_dir, pio, mmio, lifecycle, serial_ring, serial, boot_time, events, power_button, cmos, devices } = self;
        let shared = Arc::new(VmShared {
            name: spec.name.clone(),
            memory_mib: spec.memory_mib,
            start,
            lifecycle,
            control: Arc::new(RunControl::default()),
            exits: Arc::new((0..spec.vcpus).map(|_| AtomicU64::new(0)).collect()),
            boot_time,
            serial_ring,
            serial,
            power_button,
            devices,
            snapshot: snapshot::Sources {
                spec: spec.clone(),
                vm: vm.clone(),
                memfd: ram.memfd.clone(),
                mem_size: ram.size,
                vcpus: vcpus.clone(),
                msrs,
                cmos,
            },
            events,
            vm_dir,
            threads: Mutex::new(Vec::new()),
        });
        Vmm { spec, vm, ram, pio, mmio, vcpus, shared }
    }
}

impl Vmm {
    /// A cold boot: the kernel, its initramfs and the ACPI tables into RAM, vCPU 0 at the
    /// kernel's entry.
    pub fn build(spec: VmSpec, start: Instant) -> Result<Self> {
        let m = Machine::assemble(&spec, start, None)?;
        let rsdp = acpi::write_tables(&m.ram.memory, &acpi::AcpiConfig { vcpus: spec.vcpus, pci: true })?;
        boot::write_reset_stub(&m.ram.memory)?;
        let boot = boot::load(&m.ram.memory, m.ram.size, &spec.kernel, spec.initramfs.as_deref(), &spec.cmdline, rsdp)?;
        let (vcpus, msrs) = m.create_vcpus(&spec, Some(boot.entry))?;
        Ok(m.into_vmm(spec, start, vcpus, msrs))
    }

    /// Rebuilds the VM a snapshot was taken of (same spec, same devices in the same slots),
    /// fills its RAM from the snapshot and puts every vCPU, the irqchip and the devices back
    /// where they were. The vCPUs continue when [`Vmm::run`] starts them (or paused, if the
    /// caller pauses [`Vmm::shared`]'s control first).
    ///
    /// Every check of the state (memory and framebuffer checksums, disk identities, TSC
    /// frequency, CPUID) passes before any state goes into KVM, a device worker starts or a
    /// vCPU could run: a refused state ([`SnapshotError::rejects_state`]) has changed nothing.
    pub fn restore(snap: &Loaded, start: Instant) -> std::result::Result<Self, SnapshotError> {
        let vmm = Self::restore_checked(snap, start)?;
        tracing::info!("restored {} in {} ms", snap.dir.display(), start.elapsed().as_millis());
        Ok(vmm)
    }

    fn restore_checked(snap: &Loaded, start: Instant) -> Result<Self> {
        let spec = snap.state.spec.clone();
        let state_file = snap.dir.join(snapshot::STATE_FILE);
        let m = Machine::assemble(&spec, start, Some(&snap.state.legacy))?;
        // The guest's RAM already holds its kernel and ACPI tables (and has long since reused
        // the boot areas): no boot loading, only the saved memory, verified as it goes in.
        let t0 = Instant::now();
        let n = load_part(&snap.dir.join(&snap.state.memory.file), &snap.memory, &m.ram.memfd, &snap.state.memory)?;
        tracing::info!("guest RAM: {n} bytes loaded in {} ms", t0.elapsed().as_millis());
        snapshot::disks::check(&snap.state.disks, &m.devices.disks).map_err(|e| match e {
            SnapshotError::Field { file, field, reason } => Error::StateRejected { file, field: format!("disks.{field}"), reason },
            e => Error::Device { device: "virtio-blk".into(), reason: e.to_string() },
        })?;
        load_framebuffer(snap, m.devices.framebuffer())?;
        let (vcpus, msrs) = m.create_vcpus(&spec, None)?;
        let tsc_scaling = m.vm.fd.check_extension(kvm_ioctls::Cap::TscControl);
        for (v, s) in vcpus.iter().zip(&snap.state.vcpus) {
            vcpu::match_tsc(v, s, tsc_scaling, &state_file)?;
            let now = v.lock().unwrap_or_else(|p| p.into_inner()).get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES);
            let now = cpuid::entries(&now.map_err(|e| Error::kvm("KVM_GET_CPUID2", e))?);
            if let Some(why) = cpuid::first_difference(&s.cpuid, &now) {
                return Err(Error::StateRejected { file: state_file, field: format!("vcpus[{}].cpuid", s.id), reason: why });
            }
        }

        // Every check passed: the state goes in.
        m.vm.restore_state(&snap.state.vm)?;
        for (v, s) in vcpus.iter().zip(&snap.state.vcpus) {
            vcpu::restore_state(v, s)?;
        }
        m.vm.restore_clock(&snap.state.vm)?;
        // The guest was stopped for as long as the snapshot lay on disk: its soft-lockup
        // watchdog must not count that as a hang.
        vcpu::tell_guest_it_was_paused(&vcpus);
        let tsc = |msrs: &[vcpu::MsrValue]| msrs.iter().find(|m| m.index == 0x10).map(|m| m.data);
        let now = vcpu::save_state(&vcpus[0], 0, &msrs).ok();
        tracing::info!(
            "restored clocks: kvmclock saved {} ns now {:?}; vCPU 0 TSC saved {:?} now {:?}",
            snap.state.vm.clock.clock,
            m.vm.fd.get_clock().map(|c| c.clock).ok(),
            tsc(&snap.state.vcpus[0].msrs),
            now.as_ref().and_then(|n| tsc(&n.msrs)),
        );
        let pci = m.devices.pci.as_ref().ok_or_else(|| Error::Device { device: "pci".into(), reason: "no PCI root".into() })?;
        pci.restore_state(&snap.state.pci).map_err(|e| Error::Device { device: "pci".into(), reason: e.to_string() })?;
        // Virtio workers continue from the ring indices in the restored RAM.
        pci.resume();
        Ok(m.into_vmm(spec, start, vcpus, msrs))
    }

    pub fn shared(&self) -> Arc<VmShared> {
        self.shared.clone()
    }

    /// Runs the VM until it ends. `inherited_fds` (from [`isolation::inherited_fds`] at
    /// process start) are closed when the spec asks for isolation; `supervisor` (the
    /// `--control-fd` connection, not among them) gets the events and serves requests;
    /// `display` (the `--display-fd` channel, not among them either) is served to the
    /// compositor, and refused when the VM has no display.
    pub fn run(
        self,
        inherited_fds: &std::collections::BTreeSet<i32>,
        supervisor: Option<UnixStream>,
        display: Option<std::os::fd::OwnedFd>,
    ) -> Result<ExitReason> {
        let Vmm { spec, vm, ram, pio, mmio, vcpus, shared } = self;
        vcpu::install_kick_handler()?;
        if let Some(sock) = display {
            // Before isolation: the channel reopens the framebuffer read-only through /proc.
            display_channel::Channel::new(sock, &shared.devices)?.spawn()?;
        }
        if let Some(path) = &spec.control_socket {
            let listener = control::bind(path)?;
            control::spawn(shared.clone(), listener)?;
        }
        if let Some(conn) = supervisor {
            events::serve(shared.clone(), conn)?;
        }
        if spec.isolate {
            let confine = isolation::Confinement { vm_dir: shared.vm_dir.as_ref().map(|d| d.raw_fd()), run_as: spec.run_as };
            isolation::isolate(inherited_fds, confine)?;
        }
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut handles = Vec::new();
        for (id, fd) in vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                pio: pio.clone(),
                mmio: mmio.clone(),
                lifecycle: shared.lifecycle.clone(),
                control: shared.control.clone(),
                exits: shared.exits.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run(fd, id, ctx))
                .map_err(|e| Error::io(format!("spawning vCPU {id}"), e))?;
            use std::os::unix::thread::JoinHandleExt;
            shared.threads.lock().unwrap_or_else(|p| p.into_inner()).push(h.as_pthread_t());
            handles.push(h);
        }

        tracing::info!("vCPUs started {} ms after VMM start", shared.start.elapsed().as_millis());
        let mut reason =
            watch(&shared, Duration::from_millis(spec.progress_timeout_ms), Duration::from_millis(spec.hang_timeout_ms));
        if let ExitReason::Failed(why) = &reason {
            if shared.boot_time.get().is_none() && why.starts_with("vCPU") {
                // kvm_pvm hosts either never return from KVM_RUN or fail emulation early.
                reason = ExitReason::Failed(format!(
                    "{why} before the guest reached init: this host's KVM may be unable to run ordinary guests"
                ));
            }
        }
        let why = match &reason {
            ExitReason::PowerOff => "the guest powered off".to_string(),
            ExitReason::Reboot(why) => format!("the guest rebooted ({why})"),
            ExitReason::Failed(why) | ExitReason::GuestHung(why) => why.clone(),
        };
        shared.events.send(rayos_proto::vmm::Event::Exiting { code: reason.exit_code(), reason: why });
        shared.control.stop();
        let threads = shared.threads.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let t0 = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) && t0.elapsed() < Duration::from_secs(1) {
            shared.kick(&threads);
            std::thread::sleep(Duration::from_millis(2));
        }
        for h in handles {
            if h.is_finished() {
                let _ = h.join();
            }
        }
        drop((vm, ram));
        // Isolated, the VMM may not unlink outside its own directory (and, as another user,
        // could not in rayosd's runtime directory): whoever starts the next VMM clears the
        // stale socket (see `control::bind`).
        if let (Some(p), false) = (&spec.control_socket, spec.isolate) {
            let _ = std::fs::remove_file(p);
        }
        Ok(reason)
    }
}

/// Waits for the VM to end, failing it if the guest makes no progress while it boots.
///
/// A host KVM that cannot run guests (kvm_pvm) never returns from KVM_RUN, so vCPU 0's first
/// exit must come within `stall`. Later, in early boot (fewer than [`EARLY_BOOT_EXITS`] exits
/// and no device in use yet), a silence of [`LATE_STALL_FACTOR`]× `stall` fails the same way:
/// a quiet kernel under nested emulation can go seconds without an exit.
///
/// Once the guest's devices are up, until it reaches init (the boot-timer write), progress
/// is any vCPU exit or any virtio notification (a guest reading its disk through an ioeventfd
/// makes no exit): none for `hang` is a hung guest ([`ExitReason::GuestHung`], exit 11), the
/// way the default VM was seen to stop right after its virtio-blk came up. After init nothing
/// is judged here: an idle booted guest with an in-kernel LAPIC may never exit again; its
/// supervisor watches the guest agent's heartbeats instead.
fn watch(shared: &VmShared, stall: Duration, hang: Duration) -> ExitReason {
    const EARLY_BOOT_EXITS: u64 = 2000;
    const LATE_STALL_FACTOR: u32 = 6;
    use devices::virtio::worker::GUEST_KICKS;
    let kicks_at_start = GUEST_KICKS.load(Ordering::Relaxed);
    let mut last = (0u64, 0u64);
    let mut last_change = Instant::now();
    let mut first_logged = false;
    // The longest the guest went without progress before init, for the log (what `hang`
    // must stay well above).
    let mut longest = Duration::ZERO;
    let mut init_logged = false;
    loop {
        if let Some(r) = shared.lifecycle.wait_timeout(Duration::from_millis(50)) {
            return r;
        }
        let exits0 = shared.exits[0].load(Ordering::Relaxed);
        if exits0 > 0 && !first_logged {
            first_logged = true;
            tracing::info!("vCPU 0 first exit {} ms after VMM start", shared.start.elapsed().as_millis());
        }
        if shared.boot_time.get().is_some() {
            if !init_logged {
                init_logged = true;
                tracing::info!("longest pause in guest progress before init: {} ms", longest.as_millis());
            }
            continue;
        }
        if shared.control.is_paused() {
            last_change = Instant::now();
            continue;
        }
        let exits: u64 = shared.exits.iter().map(|e| e.load(Ordering::Relaxed)).sum();
        let kicks = GUEST_KICKS.load(Ordering::Relaxed) - kicks_at_start;
        if (exits, kicks) != last {
            longest = longest.max(last_change.elapsed());
            last = (exits, kicks);
            last_change = Instant::now();
            continue;
        }
        let quiet = last_change.elapsed();
        let devices_up = kicks > 0 || exits0 >= EARLY_BOOT_EXITS;
        if devices_up {
            if quiet >= hang {
                let why = format!(
                    "the guest stopped making progress before it reached init: no vCPU exit and no virtio \
                     notification for {} s, {:.1} s after VMM start (after {exits} exits and {kicks} virtio notifications)",
                    quiet.as_secs(),
                    shared.start.elapsed().as_secs_f64()
                );
                tracing::error!("{why}");
                shared.lifecycle.request(ExitReason::GuestHung(why));
            }
        } else if quiet >= if exits0 == 0 { stall } else { stall * LATE_STALL_FACTOR } {
            let e = Error::NoProgress { exits: exits0, secs: shared.start.elapsed().as_secs_f64() };
            shared.lifecycle.request(ExitReason::Failed(e.to_string()));
        }
    }
}
