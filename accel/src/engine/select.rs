//! Backend selection: which [`Backend`] an [`Engine`] runs on.
//!
//! [`BackendChoice`] is what a VMM puts in its pipeline configuration (and what the
//! demo's `--accel` flag parses); [`Engine::build`] turns it into an engine:
//!
//! - [`BackendChoice::Auto`]: the first hardware backend that finds a usable device
//!   (IAA, then QAT), else software. Never fails for want of hardware.
//! - [`BackendChoice::Software`]: the software codecs only.
//! - [`BackendChoice::Iaa`]: Intel IAA through one [`IaaPortal`] (a kernel idxd work
//!   queue, VFIO, or the device model); fails with [`EngineError::Unavailable`] when
//!   that portal cannot be opened.
//! - [`BackendChoice::Qat`]: Intel QAT; fails with [`EngineError::Unavailable`] when
//!   no QAT instance can be started.
//!
//! Every hardware engine keeps the software codecs for the jobs it hands back (see
//! [`super::fallback`]). Each hardware backend plugs in with two functions here: one
//! that opens it for an explicit choice and one that tries it for `Auto`.

use std::path::PathBuf;
use std::str::FromStr;

use super::{Backend, BackendKind, Engine, EngineConfig, EngineError, SoftwareConfig};

/// Which codec backend to run (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendChoice {
    /// Hardware when a usable device is present (IAA, then QAT), else software.
    #[default]
    Auto,
    /// The software codecs only.
    Software,
    /// Intel IAA through the given portal.
    Iaa(IaaPortal),
    /// Intel QAT.
    Qat,
}

/// How an IAA backend reaches its device.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IaaPortal {
    /// A kernel idxd user work queue (`/dev/iax/wqX.Y`); `None` takes the first usable
    /// one found under `/sys/bus/dsa/devices`.
    Wq(Option<PathBuf>),
    /// A device bound to `vfio-pci`, by PCI address (`0000:6a:02.0`); needs the
    /// `vfio` feature.
    Vfio(String),
    /// The IAA device model (software standing in for the device, for tests and
    /// `demo --accel model`), with optional fault injection.
    Model(ModelFaults),
}

/// A fault the IAA device model injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ModelFault {
    /// The work queue rejects submissions (ENQCMD retry / no free slot).
    QueueFull,
    /// The device reports a page fault with a partial completion.
    PageFault,
    /// The device reports an output overflow.
    OutputOverflow,
    /// A descriptor never completes.
    Hang,
    /// The device is disabled (as by an administrator or a device error) and stays so.
    DeviceDisabled,
}

impl ModelFault {
    /// Every fault, in a fixed order.
    pub const ALL: [ModelFault; 5] = [
        ModelFault::QueueFull,
        ModelFault::PageFault,
        ModelFault::OutputOverflow,
        ModelFault::Hang,
        ModelFault::DeviceDisabled,
    ];

    /// The name `--accel model:NAME` uses.
    pub fn name(self) -> &'static str {
        match self {
            ModelFault::QueueFull => "queue-full",
            ModelFault::PageFault => "page-fault",
            ModelFault::OutputOverflow => "overflow",
            ModelFault::Hang => "hang",
            ModelFault::DeviceDisabled => "disable",
        }
    }
}

/// The device model's fault plan: which fault, on which descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFaults {
    /// The fault to inject, if any.
    pub fault: Option<ModelFault>,
    /// Inject it on every `every`-th descriptor the model receives (1: on all of
    /// them); for [`ModelFault::DeviceDisabled`], the device is disabled once it has
    /// received `every` descriptors.
    pub every: u32,
}

impl Default for ModelFaults {
    fn default() -> Self {
        Self {
            fault: None,
            every: 1,
        }
    }
}

/// Why a `--accel` string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad backend choice {0:?}: use auto, software, iaa, iaa:/dev/iax/wqX.Y, \
     vfio:DDDD:BB:DD.F, model, model:FAULT[/N] (FAULT: queue-full, page-fault, \
     overflow, hang, disable) or qat"
)]
pub struct BadChoice(pub String);

impl FromStr for BackendChoice {
    type Err = BadChoice;

    /// Parses `auto`, `software`, `iaa`, `iaa:PATH`, `vfio:PCI`, `model`,
    /// `model:FAULT`, `model:FAULT/N` or `qat`.
    fn from_str(s: &str) -> Result<Self, BadChoice> {
        let bad = || BadChoice(s.to_owned());
        let (head, tail) = match s.split_once(':') {
            Some((h, t)) => (h, Some(t)),
            None => (s, None),
        };
        Ok(match (head, tail) {
            ("auto", None) => BackendChoice::Auto,
            ("software" | "sw", None) => BackendChoice::Software,
            ("qat", None) => BackendChoice::Qat,
            ("iaa", None) => BackendChoice::Iaa(IaaPortal::Wq(None)),
            ("iaa", Some(p)) if !p.is_empty() => {
                BackendChoice::Iaa(IaaPortal::Wq(Some(PathBuf::from(p))))
            }
            ("vfio", Some(a)) if !a.is_empty() => BackendChoice::Iaa(IaaPortal::Vfio(a.into())),
            ("model", None) => BackendChoice::Iaa(IaaPortal::Model(ModelFaults::default())),
            ("model", Some(spec)) => {
                let (name, every) = match spec.split_once('/') {
                    Some((n, e)) => (n, e.parse::<u32>().map_err(|_| bad())?),
                    None => (spec, 1),
                };
                if every == 0 {
                    return Err(bad());
                }
                let fault = ModelFault::ALL
                    .into_iter()
                    .find(|f| f.name() == name)
                    .ok_or_else(bad)?;
                BackendChoice::Iaa(IaaPortal::Model(ModelFaults {
                    fault: Some(fault),
                    every,
                }))
            }
            _ => return Err(bad()),
        })
    }
}

impl Engine {
    /// An engine on the backend `choice` names (see the module documentation).
    ///
    /// # Errors
    /// [`EngineError::Unavailable`] when an explicitly chosen hardware backend cannot
    /// be opened (the error says why and what to do); the errors of
    /// [`Engine::software`] and [`Engine::new`].
    pub fn build(
        choice: &BackendChoice,
        config: EngineConfig,
        software: SoftwareConfig,
    ) -> Result<Engine, EngineError> {
        // Before a device is opened: a backend sizes its rings and buffers from these.
        config.check()?;
        match choice {
            BackendChoice::Software => Engine::software(config, software),
            BackendChoice::Auto => match iaa_auto(&config).or_else(|| qat_auto(&config)) {
                Some(backend) => Engine::new(config, backend),
                None => Engine::software(config, software),
            },
            BackendChoice::Iaa(portal) => {
                let backend = iaa_backend(portal, &config)?;
                Engine::new(config, backend)
            }
            BackendChoice::Qat => {
                let backend = qat_backend(&config)?;
                Engine::new(config, backend)
            }
        }
    }
}

/// Opens the IAA backend on `portal`.
fn iaa_backend(portal: &IaaPortal, config: &EngineConfig) -> Result<Box<dyn Backend>, EngineError> {
    use crate::iaa::{DeviceModel, IaaBackend, IaaConfig, ModelConfig};
    let unavailable = |reason: String| EngineError::Unavailable {
        backend: BackendKind::Iaa,
        reason,
    };
    let mut iaa = IaaConfig {
        slots: config.requests.clamp(1, 64),
        ..IaaConfig::new(config.page_size, config.max_pages)
    };
    if let IaaPortal::Model(_) = portal {
        // The model is software on shared cores: give its descriptors longer before
        // calling them hung (a device takes microseconds; 2 s stays for hardware).
        iaa.timeout = core::time::Duration::from_secs(10);
    }
    let portal: Box<dyn crate::iaa::Portal> = match portal {
        IaaPortal::Model(faults) => Box::new(
            DeviceModel::new(ModelConfig {
                faults: *faults,
                ..ModelConfig::default()
            })
            .map_err(EngineError::Spawn)?,
        ),
        IaaPortal::Wq(path) => {
            crate::iaa::wq::open(path.as_deref()).map_err(|e| unavailable(e.to_string()))?
        }
        IaaPortal::Vfio(addr) => crate::iaa::open_vfio(addr).map_err(unavailable)?,
    };
    Ok(Box::new(IaaBackend::new(portal, iaa)?))
}

/// The IAA backend on the first usable kernel work queue, if any.
fn iaa_auto(config: &EngineConfig) -> Option<Box<dyn Backend>> {
    iaa_backend(&IaaPortal::Wq(None), config).ok()
}

/// Opens the QAT backend through qatlib (or the libraries `PAGEWIRE_QATLIB` names).
fn qat_backend(config: &EngineConfig) -> Result<Box<dyn Backend>, EngineError> {
    let backend = crate::qat::QatBackend::new(crate::qat::QatConfig::default(), config)?;
    Ok(Box::new(backend))
}

/// The QAT backend on the first usable instance, if any.
fn qat_auto(config: &EngineConfig) -> Option<Box<dyn Backend>> {
    qat_backend(config).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_bad_ones_are_refused() {
        let ok = |s: &str| s.parse::<BackendChoice>().expect(s);
        assert_eq!(ok("auto"), BackendChoice::Auto);
        assert_eq!(ok("software"), BackendChoice::Software);
        assert_eq!(ok("qat"), BackendChoice::Qat);
        assert_eq!(ok("iaa"), BackendChoice::Iaa(IaaPortal::Wq(None)));
        assert_eq!(
            ok("iaa:/dev/iax/wq1.0"),
            BackendChoice::Iaa(IaaPortal::Wq(Some("/dev/iax/wq1.0".into())))
        );
        assert_eq!(
            ok("vfio:0000:6a:02.0"),
            BackendChoice::Iaa(IaaPortal::Vfio("0000:6a:02.0".into()))
        );
        assert_eq!(
            ok("model"),
            BackendChoice::Iaa(IaaPortal::Model(ModelFaults::default()))
        );
        assert_eq!(
            ok("model:page-fault/7"),
            BackendChoice::Iaa(IaaPortal::Model(ModelFaults {
                fault: Some(ModelFault::PageFault),
                every: 7
            }))
        );
        for f in ModelFault::ALL {
            let c = ok(&format!("model:{}", f.name()));
            assert!(matches!(
                c,
                BackendChoice::Iaa(IaaPortal::Model(ModelFaults { fault: Some(g), every: 1 })) if g == f
            ));
        }
        for bad in [
            "",
            "iaa:",
            "vfio",
            "model:fire",
            "model:hang/0",
            "model:hang/x",
            "gpu",
        ] {
            assert_eq!(bad.parse::<BackendChoice>(), Err(BadChoice(bad.into())));
        }
    }

    #[test]
    fn software_and_auto_build_a_software_engine_here() {
        for choice in [BackendChoice::Software, BackendChoice::Auto] {
            let engine = Engine::build(&choice, EngineConfig::default(), SoftwareConfig::default())
                .expect("engine");
            // Without a usable IAA work queue, auto lands on software.
            let wq = crate::iaa::wq::discover(
                std::path::Path::new(crate::iaa::wq::SYSFS_DEVICES),
                std::path::Path::new(crate::iaa::wq::DEV_IAX),
            );
            if choice == BackendChoice::Software || wq.usable().is_none() {
                assert_eq!(engine.probe().backend, BackendKind::Software);
            }
        }
        assert!(matches!(
            Engine::build(
                &BackendChoice::Qat,
                EngineConfig::default(),
                SoftwareConfig::default()
            ),
            Err(EngineError::Unavailable {
                backend: BackendKind::Qat,
                ..
            })
        ));
    }
}
