//! What an image's config says its container runs, with the overrides
//! docker's `run` flags make.

use oci_spec::image::ImageConfiguration;

/// The process a container of an image starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub argv: Vec<String>,
    /// The image's Env, then the caller's (later entries win).
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved in the container.
    pub user: Option<String>,
}

/// What `uvm run` was given on top of the image.
#[derive(Clone, Debug, Default)]
pub struct Overrides<'a> {
    /// COMMAND [ARG…]: replaces Cmd.
    pub command: &'a [String],
    /// `--entrypoint`: replaces Entrypoint (and, like docker, drops Cmd).
    pub entrypoint: Option<&'a str>,
    pub env: &'a [String],
    pub workdir: Option<&'a str>,
    pub user: Option<&'a str>,
}

impl RunConfig {
    pub fn new(image: &ImageConfiguration, given: &Overrides) -> Self {
        let config = image.config().clone().unwrap_or_default();
        let entrypoint = match given.entrypoint {
            Some("") => Vec::new(),
            Some(entrypoint) => vec![entrypoint.to_string()],
            None => config.entrypoint().clone().unwrap_or_default(),
        };
        let cmd = match (given.command, given.entrypoint) {
            ([], None) => config.cmd().clone().unwrap_or_default(),
            (command, _) => command.to_vec(),
        };
        let mut env = config.env().clone().unwrap_or_default();
        env.extend_from_slice(given.env);
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Self {
            argv: entrypoint.into_iter().chain(cmd).collect(),
            env,
            workdir: given
                .workdir
                .map(str::to_string)
                .or_else(|| config.working_dir().as_deref().and_then(nonempty)),
            user: given
                .user
                .map(str::to_string)
                .or_else(|| config.user().as_deref().and_then(nonempty)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfiguration {
        serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux",
                "config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo default"],
                          "Env":["PATH=/bin","A=1"],"WorkingDir":"/srv","User":"1000:50"},
                "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap()
    }

    fn argv(given: Overrides) -> Vec<String> {
        RunConfig::new(&image(), &given).argv
    }

    #[test]
    fn entrypoint_and_cmd_are_overridden_like_docker() {
        assert_eq!(
            argv(Overrides::default()),
            ["/bin/sh", "-c", "echo default"]
        );
        let command = ["echo hi".to_string()];
        let with_command = Overrides {
            command: &command,
            ..Default::default()
        };
        assert_eq!(argv(with_command), ["/bin/sh", "-c", "echo hi"]);
        let entrypoint = Overrides {
            entrypoint: Some("/bin/true"),
            ..Default::default()
        };
        assert_eq!(argv(entrypoint), ["/bin/true"]);
        let both = Overrides {
            entrypoint: Some("/bin/echo"),
            command: &command,
            ..Default::default()
        };
        assert_eq!(argv(both), ["/bin/echo", "echo hi"]);
    }

    #[test]
    fn env_workdir_and_user_come_from_the_image_then_the_flags() {
        let env = ["A=2".to_string()];
        let run = RunConfig::new(
            &image(),
            &Overrides {
                env: &env,
                workdir: Some("/tmp"),
                ..Default::default()
            },
        );
        assert_eq!(run.env, ["PATH=/bin", "A=1", "A=2"]);
        assert_eq!(run.workdir.as_deref(), Some("/tmp"));
        assert_eq!(run.user.as_deref(), Some("1000:50"));
        let plain = RunConfig::new(&image(), &Overrides::default());
        assert_eq!(plain.workdir.as_deref(), Some("/srv"));
    }
}
