"""The q35 board (x86_64): its memory/port map (:mod:`.layout`) and boot firmware."""
