#!/usr/bin/env bash
# Installs the system packages musiclm_jax needs (Debian/Ubuntu, as root or
# with sudo): FluidSynth and two General MIDI SoundFonts, to render the
# built-in corpora (FluidR3_GM, 141 MB, for corpora; TimGM6mb, 6 MB, for
# tests), opus-tools (opusenc/opusdec), the Opus baseline of `musiclm eval
# codec`, and Chromium, in which the tests load the quickstart's HTML report
# headless to check that its audio and images play. Packages already present
# are left alone, so this is cheap to rerun.
set -euo pipefail
PACKAGES=(fluidsynth fluid-soundfont-gm timgm6mb-soundfont opus-tools chromium)

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present (${PACKAGES[*]})"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "system packages: need ${missing[*]}, but apt-get is not available;" \
       "install FluidSynth and a General MIDI SoundFont (.sf2) with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "system packages: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
