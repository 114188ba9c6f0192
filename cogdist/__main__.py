from cogdist.cli import main

raise SystemExit(main())
