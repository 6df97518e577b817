//! The data module end to end: real Fashion-MNIST files (when installed), ImageFolder with
//! Pillow-exact `center_crop_arr`, and the VAE latent cache on the tiny golden VAE.

use dydit::data::idx::{read_images, read_labels, IdxDataset};
use dydit::data::image_folder::{center_crop_arr, ImageFolder};
use dydit::data::latents::{prepare_latents, LatentDataset};
use dydit::data::{open_dataset, Dataset, DatasetSpec};
use dydit::vae::Vae;
use std::path::{Path, PathBuf};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";
const GOLDEN_VAE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/golden/vae_decode_1.safetensors"
);

/// The synthetic test image the Pillow references were made from (gen script in the comment on
/// `PIL_CENTER_CROP`).
fn synth(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 37 + y * 91 + (x * y) % 17) % 256) as u8,
            ((x * x + 3 * y * y + 11) % 256) as u8,
            (((x ^ y) * 29) % 256) as u8,
        ])
    })
}

/// (w, h, image_size, hex of `np.array(center_crop_arr(synth(w, h), image_size))`), from
/// Pillow 13.0.0 running ADM's `center_crop_arr` on the same `synth` image (built with numpy:
/// `a[y, x] = [(x*37 + y*91 + (x*y) % 17) % 256, (x*x + 3*y*y + 11) % 256, ((x ^ y) * 29) % 256]`).
/// The cases cover BOX halving of even and odd sizes (257×130 → 128×65 → 64×32), bicubic
/// down- and up-scaling, and Python's round-half-even on the resized size.
const PIL_CENTER_CROP: &[(u32, u32, usize, &str)] = &[
    (41, 35, 8, "8b36a080725485be88854a7c70827d7596917a7a758a7ea9698a2c8ea688817254848e708e7673737a6b768e8b798263967e88697a2c8d86a07f82a47b7a618e7e797292817476a1788a5d897ca173823b818249838a967a836b88797e7a88828f9c7973786b868491789083849852887c7d7b70628d94657a78618e747373807da57c677f7466837852888c887a70867794917a90738f7c7980887b7c90667f747584885e857c6d919059747ca388886d7c7497767c6099808a7d744c81785e"),
    (23, 37, 16, "8baebb83b86098c45f48cd578ce2478fc3578b8a6e8b1b5d53305596554186829e96b7b47cbda45e2e3ea1441682878b5ee969558560864630c7556e7169a85d4f655f2d04925841c97e6f6ca89b5fc8c067d1d199408fc54d8a69993e5ec75f9952269b457a3e4262654ca8925c7e9e735c9c9b3c3abf016ca48497b3bca4728893469b356f8478abcba3a570a1614576a05059a450a3accf82b68b71c63c7bdf5862806baa76737745617a405a7371616aa236b1da9b6c849a8b2fa46c77aaa22b75bd2e9650357b5f3f6b7f4f608c6448bc56974e70c36598498691129ab53ead45414e5a4d707878809eca9eb5659182a6688584ab8c5c9896297ba66c37bb9375cbbdb47584988e607632373b4d0579826ebab85b978e3e6d6c7d424cad9d39e26e3c69594323714d477f5f65ae7cbc5a8dd1666694718331839845aec06147522a716f347b7147959175bdc1be36939f689674a59d5aa8a96893a9733e63ac797c8f8aa18581bc89924f4c467266869a288293268c9c40839698496ba1b384057c8795748edf809a8f829a5ac654507864905c7cd054a2948ba168cd4d35768a4a54852c58741c91bcc0ce8d93498547768876988faa9d99ebb7ab355dcf1486654c9f537ba078a93598ca69786f90826c97c2999977a63a8d16777f3ebe78729d7b6c7e826e4e8c73939c8487b7726a65547b594e597cb5a2a9667b84b27873b36cb0a4627694b0932b73782766719a877483997b34bb850b5897bc5996bb78647ca77334bc9a385695b25f39c48475c8a68d86b9786e4db452657f309896cc8699a89da8645bb3359fca659e94ab8f53e0927a11669734a94e649469919aa0868488496c7031b381678f699567c8ad69ca6f9935c4722c5f513d4973564a727652a588ae65938c5d70726f9b6379aa29a34d91ce8e47718d93719986a8794c9f7cba4974a5687c928f977874ac19a5ca3045a6cb6d4fbaa9898caf763997754340a93787c9b78e74a8876f5482a3366ba655b1ae898ebcce5e448347387c745255b770847f91cb7dbdb280ab0c7b845fbf318e77649d5eae72539e54"),
    (10, 7, 16, "1d0c212d0d2a3d0f344d10425d13526d155f7b18688e1c73aa1f83c52392e4289df82da6c032b33f38c2003ed50044fc2f0c1a400d29510f3b62104572134e82155b94186aa11c79a41f82a6238bbd289bd32daba932b94338c30a3ecb1444da560d076d0e2787104c991151a91447bb1650d5196fd31d8496207e5824785b2994772ebb6f33ca4839c8373fb5434585850f02931026a21251b11351c2163ad71844f71b74eb1f938522841f2674132b913330bf4835ce5b3bc56c419f7e473dbb122891132b62152f60162d7719258d1b3da71e78a722a16f25a438299c362e9e5033a26c38a68d3eada94494c44a3ddc1752811830181a09071b04231e0f3a20364b237b5b27b0642ac76d2ec97c33ad8e3882a23d7bb84392cf498cf14f51ac1c50681d2c1b1f021120002a23004225265728836e2cc6882fd8a133d0b638b2c53d85be4279a14887964e81b3545651233a4d2426472611512700632a007a2c17932f8aac33dac136dad43ac1ea3faef84498cb498b664f842c55753d5b573d2b47582c40752e398a2f2a9c3224a334359c377c9c3baeab3ea8bd4295d3478de14c87b5517f505776165d6a2363586d34788b357bab377fc83888de3b94c53d827440583d444042473f594b4a6b504e7c5552775a575b605e5066605f6c589f3e93aa3fa2b541b2cd42c8e845dbc347b2564a42094e000a5100235513355a22485f325d6440746a4d8970569c7659d64a82a54ba26c4dc76d4ed88d51d88353ab4c5645295a00315d004761006066197c6b3f94704ea87648bc7c4ad7825bf0567493579a2a59c7185acf395dc04c5f9853624f5d66176f6900826d0096721dab774cba7c57c38242d1883ef38e5db366967d679e3e69a8356aac4d6daa636f8e7872538d7627a8791eb67d22a08228798733738c34809229949832b29e5f6075c16776a46b7881747982807c95907e88a38156b78536d98841e38c4e9c9137319612149b0928a10f43a72959ad603f7bd25d7ca67b7e728b7f7193828ca08484b48758c98b3cef8e50f792609b973d159c0500a10005a70423ad2536b360"),
    (64, 48, 16, "724593927a4e82c5887654928f896171847e7f9cab717a588174977d85bc7c7f33828aa87b9b938075677866a3887a5690775276ab8996a9697e5b447ba1b6926c55739a6b8287a07688688c7d74727ca5808f8f8469727e97ad7f7d5e7a7d6f67a4548f7465756066959b9b7f6b46757e9571776472846f838b8d6f88737f8ab08173798178a08482757d9b678073aa8f7a6368873390879d71869d98829280794e737c7c89787f71938e817da2767d649970c884727a807a528390837f80697e9a658f7095697a2f8d844975828a9786937f8f70787b8c7a86677e786fa181b9769e4f81988c708dc8967b6c878b7c788ba17b9b958b804463723690925a7284b4968a5a7a855d7c7f9a8b839c81826ca09b5e7199ac88876c7a70be8c836190784d78799c80937c8c834e659165908c6f747d639879897d7f7e7d846a7e88687e839f947d3d7588a78273a07e7c6c719d86847451797ea08180b28b97676985329083887472589a9e4e787c6975789e869a6d748196839569737e3f9a72c98d927a7e7670806f6e929466907d628a807e696826907489737f93967c8d7c7a7779778d6d83817e8b5b9e8db7758d706b5f5a8d828f7697868f7f52848a8e80845b8a787a6a874f918f8e7277549a90827b7d84767d57898c9d828d7b9e8a8f808e9b69887a92886f7a799e826f6e7b7e5a8f7da188846b68730c8e768a7494929c834f78817d858b96868268877c9b7d9c6a818ead7f786786809a727b6f8c85609373848a806e867b6566803b8e809f718559998b7c757976818b828884777149b277856381b4b6787a72928e5f6485a6828578757e71868c9f847b8a6b76288f7f7c7492799b8949757f7583878b868179833cb58382648bb45a6b4dae8d9c5f767490927585748b61827e5e88876b6c7949918c5c755fab9b948b758c4a84c59e86369c81666980b79a7e6c406c999f937e897d7d5784926372777b87767b869f4d6d9f6b8f7e757198959c77858a6688833f40878cd476ac7e6e5c8f7dab766d6c498e88975e839986847871974f8b6ea583935e6f702c8d8355738e9e"),
    (257, 130, 32, "8a5a6c8876a08f7254848ec8996a3c8996b07f8264837e98687a8c8b96806f8274936e68789a9c7d86507d42c4771e4c7d1e9982426d828691899a857c6e8993829d819671887a857d7e6982829d929651686a958c8e6971728d747681885a85867ea0877a6c7d76c8929254657eb0887a3c7c9698818264868e80777a8c8e7668719274766e50889a9c7d96388a72b37b72737d96a3829a8b766e9b8b92a37f7683807a8b768e7b7b82a38e9663817a8b957e4b6a92838f7663807a7b877e7b819254747ec88a7a6c7d86a0918264636e988b7a3c7d76b0809274847e687a7a8c7d76807192c4937e388a7a9c7c7b5c867691787a917f7e998292618676718a7a917d7e899392918676517a7a917c6e697482b1968681697a717d7e698392a18d76c8718254858ea0797a6c8e9698909264858eb0898a3c7e76687f8274858e807a8a8c9e76386f72c4779e50887a99737a8b949e877c72737e76a7838a8b768e778a82a35e7687828a8b778e577992a37e9657727a7b978e876882838e7657788a3c7986b0807264837e98787a6c8a96a0908254637ec8877a9c7a86507f82c4848e38777a8c9b96806f7274886e6c8c6e8970729d9496717a7a9d7b8e9981826d728691897a7d7c7e6991828d839681797a6d7c7e6970729d938651688aad867eb0779a3c8d7698838264858ea0788a6c6d86c8919254657e50877a9c7e96388092c4867e80686a8c9da6687a827e7b82a37da683726a8b867e637b92737f96a3807a8b767e938c92837e8663918a7b868e937a82a38e7663709a8b977e33819264837e98798a3c8d86b0719254837ec8797a6c8d76a09182c4836e38897a9c7d8650818274837e68798a8c77967c869671788a917e7e897282a99686917a7a917c6e998282697676818a7a717c7e698292798686517a8a917c7e697292b97d8698809264867eb0788a3c8e86c87f8254858ea0897a6c6d86389082c4757e508b7a9c7d86687f9274867e807e8a8e828a8b847e777b92a37f867f727a8b867e877982737f869f817a7b878e878882835e866f828a8b867e578992a37e864f877a8c7b86807f8274848e68777a9c7a86507f82c4737e38887a6c8a76a0908254737ec8887a3c8986b0809264867e8c6d7e697e929d758651877a957e7e6970828d847681787a857d7e9980826d838691887a857c8e8991829d838671797a95778e80877a8c7e7668828274858e50778a9c8e76387172c4858ea0888a6c8e86c891725475aeb0997a3c7d46988072738a72a36e4663827a8b87ae4b7a7283808663808a7b978e7b7b72737e76a3808a8b878e9b8a82a37e7683917a8b778e6b828274739e68898a8c7d76808292c4847e38787a9c8d9650837254837ec879aa6c7d76a0929264642e9889da3c7bc69c77c65199da916e2e698292b17676818baa717c7e698272918696917b7a917d7e998192617676718c8a917c9e898282a16d966890a274767e80896a8c7e96388f82c4866e50798a9c8c76c8809254859ea08a6a6c7da6988f4264768eb089da4e82da8b748e579b42a36fa657826a7b869e877992837f7667828a8b876e877882737f96a7826a8b757e7789a2a36e9687856a9c7d7650a082c4738e38877a8c7b8680909274837e68777a3c7986b0717264748e98876a6c88a6a09272547d4eb67c4e697d728d77a681986a6d6d8e698e729d768651897a9d7c7e8980929da48671797a9d7c8e9980826d7276918a6a7d888e50857a9c6d86389282c4778e80877a8c7d8668817274867eb0787a3c8d8698818264768ea08a7a6c7c86c885925e7b92837f8663817a7b778e939a82a37186638e7a8b767e538b72a3808683707a8b868e637a82737f86a3817a8b768ea38182c4848e38897a9c6e8650917274755e68896a8c7d8680828264828e987a7a3c8d76b0829254736ec88a8a6c7c969c879681888a717f6e698292797676518a7a916d8e698282a97786718a6a917e5e897272a98686917b7a917b8e99838259835f347f7bb88b8251748895897a6f8e807385928c84787b837fa98086587f8cb180884b7d84b98580537a879787637c7d638084878485809284846c788890828c548886a27f7f5c7d789572926e82809d797a817888858c82947f7b6d7e5fb17d786681946675706e9a8c6e6d787690847675807e797c7e8e888670848686908e797c8e7e98767f747676807e7d7c6f837c968480808b748e7d9888947c767690808a846e7e8898837c668680a069847e8e7898728c9677709079947e7f78887d7c7a7d785a84845a78807a9b6c8a6d586a94746a77808a7b7c7a8e889a74749a87807a7b7c6a7f888a83948a7b807890808a84948a88887a8d7c8e80807a96747a76888a8d7c5e71809a84748a8658aa6d6c6e90808a74848a87788a7d7c7e88806e797c6e7f886683846678907e9a7c7e6e887673747679808e797c8e7f888683848688907e7a7c7e7f88768794757d948e8f8884747c967890848c846e718884927c766880848c747e8188a4837c668790946c847e928884727c968880a46384828680627c7ca27f88428484427590a29c8c626f88828284827690828b7c629078a27384a29590627c4c828468888868827a4c829190828584827878828c7c827f908295847a6888928d8c827e90828584a27888a27b7c628f80a274846a8b887673a47686807e796c7e7d986681846676706e998c6e6d78768f847687a07e8a7c7e7d98867e348698c08e78cc8582cc7683c0805d346e7e9880837c9684a0808c848e7f7890928c966670908a847e7f9890826c668680a078a47e9088a06e8c8a8b986a83846a88708a7d8c7a7d785a83745a77907a9c6c6a6e888a83a48a87706a7c9c7a80389a82b49a80d07881d07a85b47a87388a7d9c7680708a87a48a84887a7c6c9671908a96748a66788a8c8c7680709a85848a8798aa7c8c6687907e8a7c7e8f787674947687806e8b9c6e7f786683746678907e987c7e70787683847678908e899c8e90588677548a7d546e7e5884859c7688907c7c848e807884837c9678907c8d747e807884949c9668809c8c947e7178a4817c6689909c7474928590726c7c928f88727484929480527c8c927f78528374527780929b7c527078928384728680928b8c728978887878927b8c728080728484928878726d7cb27e80628574c28878927d8c727d80b29584626888a28c7c528090a28474627e788684848688908e6b8c8e8f887672747688907e8b7c7e7f886681746679906e9c7c6e6f88768f84768a907e7b9c8fa49c667490a07f847e808898857c968790906d747e918878747c967890808b748e818888948c766890808a846e8278888c9c7a7a889a81749a76807a7b8c6a8b888a71748a95706a7a8c7a7d785a81745a75807a9a7c8a6f886a8f746a7980786f809a94748a7488aa7b7c6e7e808a85748a83788a7a8c8e8f708a84748a84887a8a8c8e8e807a93747a86888a8a9c6e78808e899c8e7f788684848687907e7a8c7e8e887673947688706e797c6e80986683946678807e9a6c7e6fa87686848a7d847e6fa8a4846c667880947d947e819884827c968870946d948e908884838c968790847c846e717884929c766980748384828680828c7c627f78a28384a28590626d7c828f88827284828680627c8ca27f88428384427580a29c8c626e88728888927a8c82718082a484a27888a27c8c627f80a285847a8888827c7c827e90828684828878827b7c826f808295848a7f887683747677907e8b7c7e80888672848687908e7b8c8e90787671847687807e7c8c7e80686681846679906e8f6c7a756c968690908e847e806890858c667880a08c847e807890848c768990806b846e908880747c968990808a748e9088808a7c6a8b888a92748a75906a8a8c7a7c789a72849a85707a798c8a8c786a71846a86708a799c7a7d685a81845a7a85788e808a82848a86688a8c9c767d709a93848a7478aa8b8c667e707a83847a85788a6b8c768e908a72748a85887a8a7ca698807e797c7e7f787685947677708e8a7c8e7f888683848687907e798c7e90687672947688706e7aac6e7f786687546a6d547e8f788474ac9688709c7d947e7168a4a28c6678909c7e846e808884837c7688707c7c948e907884727c9679806c7354929570727b6c927f887283749275a0728b8c727f78928374727590927b8c728f689273a4729580928b3c727e18729818726a3c8290808274a4827868828c8c727e90929474727878927c8c727ea0828474828888826c6c828e7082745482"),
    (99, 200, 24, "919e50797a9c7e8678838284838e40897acc7d86688272b4747e70897a7c8d86587282a47080499884716d7861929c518270897884518c88a1718c919380897884717c6871818ca1809284859e787a6a9c7d86508182b4857e68897acc7e86408e82a4867e58795a7c8e66708f847b748843997c836c90bb90845b847883788c637d706b7d646b956883788c837d806b8b6678728284858e507a8a9c7a86688282b4858e40898acc6d76588182a4768e70797a7c8a7861818c8d7470499964356978a1918c6d7480898884758c7871807c7d9580897884957a5a6c7e76a0718254958ec8787a3c7e86b0819264857e98877a8c7f8680829274757e68796c637d90a790645b74582f976c836d906790747b84787f868c738e809771846ba478af806ea0777a6c7c86c8819254917eb0777a3c7b8698809264837e80877a8c6b66689072748f80897684518b78a1808ca97080499684716a88618f7c698260798674617a88916f8c597fa254857ec87a7a6c8d86a0708264947e98797a3c7e76b07f7274867e68896a8c7e76806e845b847883897c637ca0537f747b737843988c836d80a38e746b857873786c737d80a36c76c8829254759ea0896a6c7b9698737264858eb0787a3c8c8668828274858e80898a8c8b88a1618c6d94808978748d7a8861828c8d74804997944d6b7891918c7d74807988846d99aa3c6d86b0814264869e98886a6c7da6a0817254967ec8777a9c7d96508272c4867e38786c838c807770946b858877878c737c709780846b756837969c836c806791847b75789771beb098da3c6b5698907264829ea0888a6c8b86c87f7254a29e50777a9c8cb6387f82c480808977b4718a88716f7c718190798784617a98917e7ca171a0499694716b68618e9c518fa264756e989b4a3c6da6b0807254859ec8797a6c8d76a07f82c4867e38786a9c7e86507e746b8478838a8c838c909b6f746b947873788c737c705b7e947b757843977c836d808b7b869881a264758eb0997a3c6b86c8818254756ea0898a6c8b76388182c4857e50797a9c7a9871807c7d8490897884658a9891707c7d9490797884858a7861907c8d748049988465787a8c7e7680808274768e68976a9c6d86508182c4757e38887a6c7d96a0738254858ec8877c937d80777f848b8578bf867c638c909760747b94888f878c637c907782847b74783f837e80876a8c7c96688f8274728e50977a9c6b76388082c4727ea0887a6c7b86c87092548290598674817b88717e8c498180a98684818a88a16f9c698180898784818a78818f8c996f8274869e688a6a8c7d86807f82c4768e38897a9c6d8650908254767ec8897a6c8d86a07e848b858853898c937c80b37e947b8578b3788c638c80736f747b858893787c637c90538b966871a274857e808a7a8c7c96388092c4757e508b7a9c6b86c8818254758ea07a8a6c7a8871808c9d74905989945d7b98a17f7c5d8480a98a848d8a8881608c5d94808989848d884a9c8e66507182c4868e38876a8c7e8680819274747e68987a3c6d86b0829264859e98777c937d80678074ab8568a7967c637d807780847b8378b7779c638ca09761747b847877857e50887a9c8b86386f82c4838e80787a8c7b86687f8274718eb0997a3c6c86987f82649480798784b18a78717e8c518280899784817a88817e8c518080a97884818b78a17e9c817d92c485ae387a8a9c8f66506f9274856e68797a8c7e8680808264758e98997a3c6e76b06c84ab947883897c938e908b8e847b746893887c637d909b7f747b8478b3888c638d808b7c26388142c4867e5079ba9c8d5668719274859e807a8a8c8a7698827264757eb09a8a3c9b6871708c8d7570798864758c7881809c5d7480898974757978a1818c5d8480a9898475871aac7e366081729486be88864a7c8e96b061a264857e98797a4c7d76c0828234758ea8765c837d908770647b85589f856c737da0b780746b74689f888c537c908781846b84787f866e608a8aac7da688817294848eb08a6a7c8d8698719264837ec07b8a4c7e86a88182348580697974719c7881708c698380997974617c78b1809c598270998a84717d8891808c898c8294737e88887aac7d86607d8264837e98877a7c8c86b07f8234937ea8776a4c8c76c07b847b827863777c838c90c36c846b827893768c738b80938e746b7278a3867c537b90637b7688819294767e60897aac7c8698808264858eb06a7a7c8b86a8728234959ec07a9a4c7a8881808c8d75806968744d8b88b16f7c7d84909989846d7a9891919c4d7470998984ad786a7c8e76b0818264758e98877aac7f9660818294847e88887a5c8e8690618284958e78877ca37d805780848b8488b7768c538e808770746b837897778c737d90b780846b747857"),
];

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn center_crop_arr_matches_pillow_bytes() {
    for &(w, h, s, expect) in PIL_CENTER_CROP {
        let got = center_crop_arr(&synth(w, h), s).unwrap();
        assert_eq!(got.dimensions(), (s as u32, s as u32));
        let expect = hex(expect);
        let diffs = got
            .as_raw()
            .iter()
            .zip(&expect)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diffs, 0, "{w}×{h} → {s}: {diffs} bytes differ from Pillow");
        assert_eq!(got.as_raw(), &expect);
    }
}

fn fashion(split: &str) -> Option<(PathBuf, PathBuf)> {
    let images = Path::new(FASHION).join(format!("{split}-images-idx3-ubyte.gz"));
    let labels = Path::new(FASHION).join(format!("{split}-labels-idx1-ubyte.gz"));
    if images.exists() && labels.exists() {
        Some((images, labels))
    } else {
        println!("skipped: Fashion-MNIST not installed under {FASHION}");
        None
    }
}

#[test]
fn real_fashion_mnist_files() {
    let Some((images, labels)) = fashion("t10k") else {
        return;
    };
    let im = read_images(&images).unwrap();
    assert_eq!((im.n, im.h, im.w), (10000, 28, 28));
    assert_eq!(im.pixels.iter().map(|&p| p as u64).sum::<u64>(), 573469082);
    assert_eq!(
        im.pixels[14 * 28 + 10..14 * 28 + 18],
        [0, 0, 98, 136, 110, 109, 110, 162]
    );
    let l = read_labels(&labels).unwrap();
    assert_eq!(l[..5], [9, 2, 1, 1, 6]);
    let mut hist = [0usize; 10];
    l.iter().for_each(|&c| hist[c as usize] += 1);
    assert_eq!(hist, [1000; 10]);

    // open_dataset finds the sibling labels file and pads 28 → 32 with the background.
    let spec = DatasetSpec {
        path: images.clone(),
        labels: None,
        image_size: Some(32),
        pad_to: Some(32),
    };
    let ds = open_dataset(&spec).unwrap();
    assert_eq!(
        (ds.len(), ds.num_classes(), ds.item_shape()),
        (10000, 10, [1, 32, 32])
    );
    assert_eq!(ds.class_names()[0], "T-shirt/top");
    assert_eq!(ds.class_names()[9], "Ankle boot");
    let d = ds.describe();
    assert!(
        d.starts_with("fashion-mnist IDX") && d.contains("10000 images 1×32×32"),
        "{d}"
    );
    let mut x = vec![0f32; 32 * 32];
    assert_eq!(ds.load(0, false, 0, &mut x).unwrap(), 9);
    // Row 14 of the image is row 16 of the padded item, shifted right by 2.
    let row: Vec<f32> = x[16 * 32 + 12..16 * 32 + 20].to_vec();
    let expect: Vec<f32> = [0u8, 0, 98, 136, 110, 109, 110, 162]
        .iter()
        .map(|&p| (p as f32 / 255.0 - 0.5) / 0.5)
        .collect();
    assert_eq!(row, expect);
    assert!(
        x[..2 * 32].iter().all(|&v| v == -1.0),
        "top padding is background"
    );
    assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
    let mut y = vec![0f32; 32 * 32];
    ds.load(0, true, 0, &mut y).unwrap();
    for r in 0..32 {
        let a: Vec<f32> = x[r * 32..(r + 1) * 32].iter().rev().copied().collect();
        assert_eq!(a, y[r * 32..(r + 1) * 32]);
    }

    // Without padding and with the labels given explicitly.
    let ds = IdxDataset::open(&images, Some(&labels), None).unwrap();
    assert_eq!(ds.item_shape(), [1, 28, 28]);
    // The train labels against the test images: a count mismatch naming both files.
    if let Some((train_images, train_labels)) = fashion("train") {
        let im = read_images(&train_images).unwrap();
        assert_eq!((im.n, im.h, im.w), (60000, 28, 28));
        assert_eq!(im.pixels.iter().map(|&p| p as u64).sum::<u64>(), 3431114169);
        let l = read_labels(&train_labels).unwrap();
        assert_eq!(l[..5], [9, 0, 0, 3, 0]);
        let e = format!(
            "{:#}",
            IdxDataset::open(&images, Some(&train_labels), None)
                .err()
                .unwrap()
        );
        assert!(
            e.contains("10000 images") && e.contains("60000 labels"),
            "{e}"
        );
        assert!(e.contains("train-labels-idx1-ubyte.gz"), "{e}");
    }
    let e = format!(
        "{:#}",
        open_dataset(&DatasetSpec {
            pad_to: None,
            ..spec
        })
        .err()
        .unwrap()
    );
    assert!(e.contains("28×28") && e.contains("pad_to"), "{e}");
}

/// root/<class>/ PNGs of different sizes, plus a corrupt `.png` and a non-image file.
fn make_folder(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut files = Vec::new();
    for (k, (cls, w, h)) in [
        ("cat", 20, 16),
        ("cat", 33, 40),
        ("dog", 16, 24),
        ("dog", 50, 18),
        ("emu", 17, 17),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = root.join(cls);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("img{k}.PNG"));
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 13 + k as u32 * 40) as u8,
                (y * 7) as u8,
                ((x * y) % 251) as u8,
            ])
        });
        img.save_with_format(&p, image::ImageFormat::Png).unwrap();
        files.push((
            p,
            ["cat", "dog", "emu"]
                .iter()
                .position(|c| *c == cls)
                .unwrap() as u32,
        ));
    }
    std::fs::write(
        root.join("dog").join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    std::fs::write(root.join("emu").join("notes.txt"), b"ignored").unwrap();
    files.sort();
    files
}

#[test]
fn image_folder_skips_corrupt_files_and_preprocesses() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    let files = make_folder(&root);
    let ds = ImageFolder::open(&root, 16).unwrap();
    assert_eq!(ds.skipped(), 1);
    assert!(ds.skipped_files()[0].0.ends_with("dog/broken.png"));
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.class_names(), ["cat", "dog", "emu"]);
    assert_eq!(ds.item_shape(), [3, 16, 16]);
    assert_eq!(
        ds.files(),
        files.iter().map(|f| f.0.clone()).collect::<Vec<_>>()
    );
    assert_eq!(ds.labels(), files.iter().map(|f| f.1).collect::<Vec<_>>());
    assert!(
        ds.describe().contains("1 unreadable files skipped"),
        "{}",
        ds.describe()
    );

    let mut x = vec![0f32; 3 * 16 * 16];
    let mut xf = x.clone();
    assert_eq!(ds.len(), files.len());
    for (i, (path, label)) in files.iter().enumerate() {
        assert_eq!(ds.load(i, false, 0, &mut x).unwrap(), *label);
        ds.load(i, true, 0, &mut xf).unwrap();
        let img = image::open(path).unwrap().into_rgb8();
        let crop = center_crop_arr(&img, 16).unwrap();
        for c in 0..3 {
            for y in 0..16 {
                for xx in 0..16 {
                    let v = (crop.get_pixel(xx as u32, y as u32)[c] as f32 / 255.0 - 0.5) / 0.5;
                    assert_eq!(x[(c * 16 + y) * 16 + xx], v);
                    assert_eq!(xf[(c * 16 + y) * 16 + 15 - xx], v);
                }
            }
        }
    }
    let e = format!("{:#}", ds.load(5, false, 0, &mut x).unwrap_err());
    assert!(e.contains("out of range"), "{e}");

    // A file that breaks after opening is an error naming it, not a panic.
    std::fs::write(&files[0].0, b"gone").unwrap();
    let e = format!("{:#}", ds.load(0, false, 0, &mut x).unwrap_err());
    assert!(e.contains("img0.PNG"), "{e}");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("only")).unwrap();
    std::fs::write(empty.join("only").join("bad.jpg"), b"nope").unwrap();
    let e = format!("{:#}", ImageFolder::open(&empty, 16).err().unwrap());
    assert!(
        e.contains("no readable images") && e.contains("1 unreadable"),
        "{e}"
    );
}

#[test]
fn latent_cache_round_trip_with_the_golden_vae() {
    if !Path::new(GOLDEN_VAE).exists() {
        println!("skipped: {GOLDEN_VAE} not found");
        return;
    }
    let dev = candle::Device::Cpu;
    let vae = Vae::load(Path::new(GOLDEN_VAE), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    let files = make_folder(&root);
    let src = open_dataset(&DatasetSpec {
        image_size: Some(16),
        ..DatasetSpec::new(&root)
    })
    .unwrap();
    assert!(src.describe().contains("1 unreadable files skipped"));

    let out = dir.path().join("latents.safetensors");
    let s = prepare_latents(src.as_ref(), &vae, &out, 2, true, false).unwrap();
    assert_eq!(
        (s.count, s.flips, s.latent_shape, s.image_size),
        (5, true, [4, 8, 8], 16)
    );
    assert_eq!((s.num_classes, s.resumed_from), (3, 0));
    assert_eq!(s.bytes, std::fs::metadata(&out).unwrap().len());

    let lat = LatentDataset::open(&out).unwrap();
    assert!(lat.has_flips());
    assert_eq!(lat.len(), 5);
    assert_eq!(lat.item_shape(), [4, 8, 8]);
    assert_eq!(lat.class_names(), ["cat", "dog", "emu"]);
    assert_eq!(lat.labels(), files.iter().map(|f| f.1).collect::<Vec<_>>());
    assert!(
        lat.describe().contains("flips cached"),
        "{}",
        lat.describe()
    );

    // Stored moments = encode_moments of the same preprocessed (and mirrored) image, to f16.
    let mut px = vec![0f32; 3 * 16 * 16];
    for i in 0..5 {
        for flip in [false, true] {
            src.load(i, flip, 0, &mut px).unwrap();
            let x = candle::Tensor::from_vec(px.clone(), (1, 3, 16, 16), &dev).unwrap();
            let (m, lv) = vae.encode_moments(&x).unwrap();
            let m = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let lv = lv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (gm, glv) = lat.moments(i, flip).unwrap();
            for (a, b) in gm.iter().zip(&m).chain(glv.iter().zip(&lv)) {
                assert!(
                    (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                    "item {i} flip {flip}: {a} vs {b}"
                );
            }
        }
    }
    // Flipped encodings are really different from the unflipped ones.
    assert_ne!(
        lat.moments(1, false).unwrap().0,
        lat.moments(1, true).unwrap().0
    );

    // z = (mean + exp(logvar/2)·ε)·0.18215 with ε from the seed; same seed → same latent.
    let mut a = vec![0f32; 4 * 8 * 8];
    let mut b = a.clone();
    assert_eq!(lat.load(3, false, 42, &mut a).unwrap(), files[3].1);
    lat.load(3, false, 42, &mut b).unwrap();
    assert_eq!(a, b);
    lat.load(3, false, 43, &mut b).unwrap();
    assert_ne!(a, b);
    let (m, lv) = lat.moments(3, false).unwrap();
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for k in 0..a.len() {
        let eps: f32 = rand_distr::StandardNormal.sample(&mut rng);
        let z = (m[k] + (0.5 * lv[k]).exp() * eps) * 0.18215;
        assert!(
            (a[k] - z).abs() <= 1e-6 * z.abs().max(1.0),
            "{k}: {} vs {z}",
            a[k]
        );
    }
    // Through open_dataset (by extension), and the size check.
    let ds = open_dataset(&DatasetSpec {
        image_size: Some(16),
        ..DatasetSpec::new(&out)
    })
    .unwrap();
    assert_eq!(ds.len(), 5);
    let e = format!(
        "{:#}",
        open_dataset(&DatasetSpec {
            image_size: Some(32),
            ..DatasetSpec::new(&out)
        })
        .err()
        .unwrap()
    );
    assert!(
        e.contains("16px") && e.contains("latents.safetensors"),
        "{e}"
    );

    // Without cached flips, `flip` is a no-op and describe() says so.
    let out1 = dir.path().join("noflip.safetensors");
    prepare_latents(src.as_ref(), &vae, &out1, 3, false, false).unwrap();
    let lat1 = LatentDataset::open(&out1).unwrap();
    assert!(!lat1.has_flips());
    assert!(
        lat1.describe().contains("no flips cached"),
        "{}",
        lat1.describe()
    );
    lat1.load(2, false, 7, &mut a).unwrap();
    lat1.load(2, true, 7, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        lat1.moments(2, false).unwrap(),
        lat.moments(2, false).unwrap()
    );

    // A pixel dataset of the wrong kind is refused before anything is written.
    let bad = dir.path().join("bad.safetensors");
    let idx = dir.path().join("x-images-idx3-ubyte");
    let mut raw = vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0, 16];
    raw.extend([0u8; 256]);
    std::fs::write(&idx, raw).unwrap();
    std::fs::write(
        dir.path().join("x-labels-idx1-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 1, 0],
    )
    .unwrap();
    let gray = open_dataset(&DatasetSpec::new(&idx)).unwrap();
    let e = format!(
        "{:#}",
        prepare_latents(gray.as_ref(), &vae, &bad, 2, false, false).unwrap_err()
    );
    assert!(e.contains("3×S×S") && e.contains("1×16×16"), "{e}");
    assert!(!bad.exists());
}
